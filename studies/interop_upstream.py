"""Run CLAM's and TRIDENT's own code on madflow's outputs: do the tools read, at madflow's
exported coords, the pixels madflow embedded, and do their feature pipelines and loaders
give madflow's features? (docs/slides.md, "Checked with CLAM's and TRIDENT's own code")

    python studies/interop_upstream.py --clam CLAM_DIR --trident TRIDENT_DIR [--deps DIR]
        [--encoder results/mad/seed0/encoder.pt] [--out DIR]

CLAM_DIR and TRIDENT_DIR are checkouts of github.com/mahmoodlab/CLAM (read at 53e2409) and
github.com/mahmoodlab/TRIDENT (a91fa84). TRIDENT also imports opencv-python-headless,
geopandas, pyogrio, scikit-image, lazy_loader and einops: install them into the venv or
into a folder given as --deps (`pip install --no-deps --target DIR ...`). Without --encoder
a randomly initialised ViT of config.yaml's model is used (seed 0).

Slides (written here, T = 64 as in config.yaml): `demo`, a demo slide (4096 px, 40x, level
downsamples 4 and 16); `odd`, the same tissue cut to 3001 x 2602 px (sides not multiples of
the 1024 px 2.5x footprint, so it has edge tiles; OpenSlide reports downsamples 4.0022 and
16.05); `scan20`, the demo pixels as a 20x scan (10x and 2.5x resized from finer levels,
40x lacking). Each goes through what the workflow runs (manifest check, tiling, coords,
embedding, export), then through:

- CLAM: `Whole_Slide_Bag_FP` (dataset_modules/dataset_h5.py) reads the coords file; its
  `compute_w_loader` (extract_features_fp.py) embeds those patches with madflow's encoder;
  `Generic_MIL_Dataset` (dataset_modules/dataset_generic.py) loads the exported `pt_files`.
- TRIDENT: `OpenSlideWSI.extract_patch_features` reads the coords file (its patcher picks
  its own level) and embeds the patches with madflow's encoder; `trident.IO.read_coords`
  reads the exported `patches/{slide}_patches.h5`.

Patches the tools read at another size than T are resized to T with a box filter, as
madflow resizes (the transform a user of a T px encoder would give). Prints a markdown
table: tiles, identical tiles and mean absolute pixel difference, and the largest feature
difference and smallest cosine against madflow's exported features.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from madflow.embed import build_encoder, embed_slide, l2_normalise  # noqa: E402
from madflow.features import export_slide, trident_folder  # noqa: E402
from madflow.manifest import check_manifest  # noqa: E402
from madflow.slides import SlideReader, mag_str  # noqa: E402
from madflow.synth.demo import make_slide  # noqa: E402
from madflow.synth.pyramid import write_pyramid  # noqa: E402
from madflow.tiling import tile_slide, write_coords_h5  # noqa: E402

MAGS = [2.5, 10.0, 40.0]
TILE_PX = 64


class Encoder(torch.nn.Module):
    """madflow's encoder behind the interface both tools call: model(batch) on a batch of
    uint8 (T, T, 3) tensors, with TRIDENT's `eval_transforms`, `enc_name` and `precision`."""

    def __init__(self, encode):
        super().__init__()
        self.encode = encode
        self.enc_name = "madflow"
        self.precision = torch.float32

    @staticmethod
    def eval_transforms(img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        if img.size != (TILE_PX, TILE_PX):
            img = img.resize((TILE_PX, TILE_PX), Image.BOX)
        return torch.from_numpy(np.asarray(img).copy())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(l2_normalise(self.encode(batch.cpu().numpy())))


def write_slides(folder: Path) -> dict[str, Path]:
    demo = folder / "demo.svs"
    make_slide(demo, seed=1, size=4096)
    with SlideReader(demo) as reader:
        pixels = reader.read_level_region(0, 0, 0, 4096, 4096)
    odd, scan20 = folder / "odd.svs", folder / "scan20.svs"
    write_pyramid(odd, pixels[:2602, :3001], objective_power=40, mpp=0.25)
    write_pyramid(scan20, pixels, objective_power=20, mpp=0.5)
    return {"demo": demo, "odd": odd, "scan20": scan20}


def madflow_outputs(slides: dict[str, Path], out: Path, encode, name: str) -> dict:
    """What the workflow writes per slide: coords per magnification, embeddings, and the
    exported features in CLAM's and TRIDENT's layouts."""
    table = out / "slides.tsv"
    pd.DataFrame({"slide_id": list(slides), "path": [str(p) for p in slides.values()]}).to_csv(
        table, sep="\t", index=False)
    checked, _ = check_manifest(table, MAGS, TILE_PX, "error", 0.34, 0)
    outputs = {}
    for slide in checked.to_dict("records"):
        sid = slide["slide_id"]
        grid, *_ = tile_slide(slide, MAGS, TILE_PX, 0.5)
        grid.to_parquet(out / f"{sid}.parquet")
        coords = {m: out / "coords" / f"{mag_str(m)}x" / f"{sid}.h5" for m in MAGS}
        for m in MAGS:
            write_coords_h5(grid, slide, m, TILE_PX, coords[m])
        embedded = out / "embeddings" / f"{sid}.h5"
        embed_slide(str(out / f"{sid}.parquet"), encode, name, str(embedded), 256)
        feats = out / "features"
        clam_h5 = [feats / f"{mag_str(m)}x" / "h5_files" / f"{sid}.h5" for m in MAGS]
        clam_pt = [feats / f"{mag_str(m)}x" / "pt_files" / f"{sid}.pt" for m in MAGS]
        patches = [feats / "trident" / trident_folder(m, TILE_PX) / "patches" / f"{sid}_patches.h5" for m in MAGS]
        tri_feats = [feats / "trident" / trident_folder(m, TILE_PX) / "features_madflow" / f"{sid}.h5" for m in MAGS]
        export_slide(embedded, [coords[m] for m in MAGS], clam_h5, clam_pt, MAGS, patches, tri_feats)
        outputs[sid] = {"slide": slides[sid], "grid": grid, "coords": coords, "h5": dict(zip(MAGS, clam_h5)),
                        "pt_dir": {m: feats / f"{mag_str(m)}x" for m in MAGS}, "patches": dict(zip(MAGS, patches))}
    return outputs


def as_tile(patch) -> np.ndarray:
    return Encoder.eval_transforms(patch if isinstance(patch, Image.Image) else Image.fromarray(patch)).numpy()


def pixel_agreement(mine: np.ndarray, theirs: np.ndarray) -> tuple[str, str]:
    diff = np.abs(mine.astype(np.int16) - theirs.astype(np.int16))
    identical = (diff.reshape(len(diff), -1).max(axis=1) == 0).mean() if len(diff) else float("nan")
    return f"{identical:.1%}", f"{diff.mean():.2f}" if len(diff) else "-"


def feature_agreement(mine: np.ndarray, theirs: np.ndarray) -> tuple[str, str]:
    if not len(mine):
        return "-", "-"
    cos = (l2_normalise(mine) * l2_normalise(theirs)).sum(axis=1)
    return f"{np.abs(mine - theirs).max():.1e}", f"{cos.min():.4f}"


def check(outputs: dict, model: Encoder, work: Path) -> list[dict]:
    from dataset_modules.dataset_generic import Generic_MIL_Dataset
    from dataset_modules.dataset_h5 import Whole_Slide_Bag_FP
    from torch.utils.data import DataLoader
    import openslide
    from trident import OpenSlideWSI
    from trident.IO import read_coords

    argv, sys.argv = sys.argv, [sys.argv[0]]  # extract_features_fp parses its arguments on import
    from extract_features_fp import compute_w_loader
    sys.argv = argv
    pd.set_option("future.infer_string", False)  # CLAM's Generic_MIL_Dataset under pandas 3

    rows = []
    for sid, o in outputs.items():
        reader = SlideReader(o["slide"])
        for mag in MAGS:
            at_mag = o["grid"][(o["grid"]["mag"] == mag) & o["grid"]["tissue"]]
            with h5py.File(o["h5"][mag], "r") as f:
                exported, xy = f["features"][:], f["coords"][:]
            mine = reader.read_tiles(at_mag) if len(at_mag) else np.zeros((0, TILE_PX, TILE_PX, 3), np.uint8)
            grid = o["grid"][o["grid"]["mag"] == mag]
            edge = int(((grid["tissue_frac"] >= 0.5) & ~grid["inside"]).sum())
            row = {"slide": sid, "mag": f"{mag_str(mag)}x", "tiles": len(xy), "edge tiles left out": edge}
            # CLAM: its dataset reads the coords file; its extraction loop embeds
            bag = Whole_Slide_Bag_FP(str(o["coords"][mag]), openslide.OpenSlide(str(o["slide"])),
                                     img_transforms=lambda img: img)
            clam_pixels = np.stack([as_tile(bag[i]["img"]) for i in range(len(bag))]) if len(bag) else mine
            row["CLAM identical"], row["CLAM MAE"] = pixel_agreement(mine, clam_pixels)
            if len(bag):
                bag.roi_transforms = Encoder.eval_transforms
                out_h5 = work / f"clam_{sid}_{mag_str(mag)}.h5"
                compute_w_loader(str(out_h5), DataLoader(bag, batch_size=256), model)
                with h5py.File(out_h5, "r") as f:
                    assert np.array_equal(f["coords"][:], xy)
                    clam_features = f["features"][:]
            else:
                clam_features = exported
            row["CLAM max |Δf|"], row["CLAM min cos"] = feature_agreement(exported, clam_features)
            # CLAM's MIL loader on the exported pt_files
            csv = work / f"clam_{sid}.csv"
            pd.DataFrame({"case_id": [sid], "slide_id": [sid], "label": ["a"]}).to_csv(csv, index=False)
            dataset = Generic_MIL_Dataset(csv_path=str(csv), data_dir=str(o["pt_dir"][mag]), shuffle=False,
                                          print_info=False, label_dict={"a": 0}, patient_strat=False,
                                          ignore=[])
            loaded, _ = dataset[0]
            row["CLAM MIL load"] = "equal" if np.array_equal(loaded.numpy(), exported) else "DIFFERS"
            # TRIDENT: its patcher reads the coords file; its extraction loop embeds
            wsi = OpenSlideWSI(slide_path=str(o["slide"]), lazy_init=False, max_workers=0)
            if len(xy):
                attrs, coords = read_coords(str(o["coords"][mag]))
                patcher = wsi.create_patcher(patch_size=attrs["patch_size"], src_mag=attrs["level0_magnification"],
                                             dst_mag=attrs["target_magnification"], custom_coords=coords,
                                             coords_only=False, pil=True)
                trident_pixels = np.stack([as_tile(patcher[i][0]) for i in range(len(patcher))])
                row["TRIDENT level"] = f"{patcher.level} (madflow {int(at_mag['level'].iloc[0])})"
                saved = wsi.extract_patch_features(model, str(o["coords"][mag]), str(work / f"trident_{mag_str(mag)}"),
                                                   device="cpu", batch_limit=256)
                with h5py.File(saved, "r") as f:
                    assert np.array_equal(f["coords"][:], xy)
                    trident_features = f["features"][:]
            else:
                trident_pixels, trident_features, row["TRIDENT level"] = mine, exported, "-"
            row["TRIDENT identical"], row["TRIDENT MAE"] = pixel_agreement(mine, trident_pixels)
            row["TRIDENT max |Δf|"], row["TRIDENT min cos"] = feature_agreement(exported, trident_features)
            patch_attrs, patch_coords = read_coords(str(o["patches"][mag]))
            row["TRIDENT patches"] = "equal" if np.array_equal(patch_coords, xy) else "DIFFERS"
            rows.append(row)
            print(row, flush=True)
        reader.close()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clam", required=True, type=Path)
    parser.add_argument("--trident", required=True, type=Path)
    parser.add_argument("--deps", type=Path, help="folder of TRIDENT's extra dependencies")
    parser.add_argument("--encoder", help="a madflow encoder.pt (default: random-init ViT of config.yaml)")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(p) for p in (args.deps, args.trident, args.clam) if p]
    torch.manual_seed(0)
    if args.encoder:
        encode, name = build_encoder({"mode": "mad"}, args.encoder, TILE_PX)
    else:
        model_cfg = yaml.safe_load((REPO / "config.yaml").read_text())["model"]
        encode, name = build_encoder({"mode": "external", "arch": model_cfg["arch"], "kwargs": model_cfg["kwargs"]},
                                     None, TILE_PX)
    work = args.out or Path(tempfile.mkdtemp(prefix="interop_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"encoder: {name}; working in {work}", flush=True)
    outputs = madflow_outputs(write_slides(work), work, encode, name)
    rows = check(outputs, Encoder(encode), work)
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
