"""Memory per GPU of one training step of a config (default: config_paper.yaml over
config.yaml), for DDP and for FSDP (full sharding), with and without activation checkpointing.

Parameter counts are exact: the student and teacher (backbone + DINO head) are built on the
meta device from the config. Activations are measured, not guessed: one transformer block of
the config's backbone at full width runs forward on CPU under bf16 autocast (what a CUDA step
runs under) for one image, and every tensor autograd saves for the backward is counted; a step
holds that for every block and every student image (the teacher runs without grad and frees
its activations layer by layer). With activation checkpointing a block keeps only its input.
On CPU the attention is PyTorch's SDPA, which like FlashAttention saves its output and the
log-sum-exp, not the T x T attention matrix; CUDA allocator fragmentation and the CUDA context
(~0.5-1 GB) come on top: read the totals with ~10% headroom.

    python bench/memory_per_gpu.py                          # config_paper.yaml, 32 GPUs
    python bench/memory_per_gpu.py --gpus 8 16 32 --configfile config_paper.yaml
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import yaml

from madflow.config import deep_merge
from madflow.model import MADModel

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def merged(*files: Path) -> dict:
    cfg: dict = {}
    for f in files:
        deep_merge(cfg, yaml.safe_load(f.read_text()))
    return cfg


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_bytes(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of every tensor autograd saves in ``block(x)`` under bf16 autocast (x included)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    del y
    return sum(seen.values())


def materialised(module: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of a module built on the meta device, with random weights."""
    module = copy.deepcopy(module).to_empty(device="cpu")
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return module


def block_activation_bytes(backbone: torch.nn.Module, img_size: int) -> tuple[int, int, int, int]:
    """-> (bytes one block saves per image, bytes it saves whatever the batch (its bf16 weight
    copies), bytes of its input per image, tokens per image)."""
    block = materialised(backbone.blocks[0])
    patch = backbone.patch_embed.patch_size[0]
    tokens = (img_size // patch) ** 2 + backbone.num_prefix_tokens
    one, two = (saved_bytes(block, torch.randn(b, tokens, backbone.embed_dim, requires_grad=True)) for b in (1, 2))
    return two - one, 2 * one - two, tokens * backbone.embed_dim * 4, tokens  # fp32 residual stream


def check_on_small_model(cfg: dict, images: int = 8) -> tuple[float, float]:
    """(estimated, measured) MiB that the blocks of a whole backbone save for `images` images:
    the same block-by-block estimate checked on a model small enough to run whole on CPU."""
    img = int(cfg["tiling"]["tile_px"])
    with torch.device("meta"):
        backbone = MADModel.from_config(cfg["model"], img).student.backbone
    per_image, weights_bf16, _, tokens = block_activation_bytes(backbone, img)
    blocks = torch.nn.Sequential(*(materialised(b) for b in backbone.blocks))
    measured = saved_bytes(blocks, torch.randn(images, tokens, backbone.embed_dim, requires_grad=True))
    estimated = len(backbone.blocks) * (per_image * images + weights_bf16)
    return estimated / 2**20, measured / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", default=str(REPO / "config_paper.yaml"))
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64], help="GPUs of the job (world size)")
    parser.add_argument("--check-configfile", default=str(REPO / "config.yaml"),
                        help="a config whose model runs whole on CPU, to check the estimate on")
    args = parser.parse_args(argv)
    cfg = merged(REPO / "config.yaml", Path(args.configfile))
    img = int(cfg["tiling"]["tile_px"])
    with torch.device("meta"):
        model = MADModel.from_config(cfg["model"], img)
    backbone = model.student.backbone
    n_student, n_backbone = count(model.student), count(backbone)
    n_all = n_student + count(model.teacher)
    per_image, weights_bf16, block_in, tokens = block_activation_bytes(backbone, img)
    depth = len(backbone.blocks)
    n_block = count(backbone.blocks[0])
    train = cfg["train"]
    views = int(train["n_local"]) + (1 if train.get("parent_view") else 0)
    print(f"{cfg['model']['arch']}: backbone {n_backbone / 1e6:.1f} M parameters, student with head "
          f"{n_student / 1e6:.1f} M, student + teacher {n_all / 1e6:.1f} M; {depth} blocks of "
          f"{n_block / 1e6:.1f} M, {tokens} tokens at {img} px; under bf16 autocast a block saves "
          f"{per_image / 2**20:.1f} MiB per image and {weights_bf16 / 2**20:.1f} MiB of bf16 weight copies")
    print(f"global batch {train['batch_parents']} parents x {views} student views\n")
    print("| GPUs | student images / GPU | sharding | weights (student fp32, teacher fp32, bf16 copies) "
          "| gradients (+ DDP buckets) | AdamW state | activations | activations, checkpointing "
          "| total | total, checkpointing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for world in args.gpus:
        images = int(train["batch_parents"]) // world * views
        act = depth * per_image * images
        act_ckpt = depth * block_in * images + per_image * images  # block inputs + one block recomputed
        for sharding in ("ddp", "fsdp"):
            if sharding == "ddp":  # every GPU holds everything; DDP's buckets copy the gradients
                weights = 4 * n_all + depth * weights_bf16
                grads, adam = 2 * 4 * n_student, 8 * n_student
            else:  # full sharding: 1/world of each, plus two gathered bf16 blocks (prefetch)
                weights = 4 * n_all / world + 2 * 2 * n_block
                grads, adam = 4 * n_student / world + 4 * n_block, 8 * n_student / world
            state = weights + grads + adam
            print(f"| {world} | {images} | {sharding} | {weights / GB:.1f} GB | {grads / GB:.1f} GB "
                  f"| {adam / GB:.1f} GB | {act / GB:.1f} GB | {act_ckpt / GB:.1f} GB "
                  f"| {(state + act) / GB:.1f} GB | {(state + act_ckpt) / GB:.1f} GB |")
    small = merged(REPO / "config.yaml", Path(args.check_configfile))
    estimated, measured = check_on_small_model(small)
    print(f"\ncheck on {small['model']['arch']} {small['model'].get('kwargs')} ({args.check_configfile}), 8 images: "
          f"the blocks save {measured:.2f} MiB, estimated block by block {estimated:.2f} MiB")


if __name__ == "__main__":
    main()
