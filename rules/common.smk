# Helpers shared by the rules (the only place for Python functions, per snakemake --lint).
import json
from pathlib import Path

from snakemake.utils import validate

from madflow.config import resolve_train_config
from madflow.manifest import read_checked_manifest
from madflow.modes import get_mode
from madflow.slides import mag_str

validate(config, "../schemas/config.schema.yaml")

RESULTS = "results"
MAGS = sorted(float(m) for m in config["tiling"]["magnifications"])
EXPERIMENTS = list(config["experiments"])
SEEDS = [int(s) for s in config["train"]["seeds"]]
STUDY_SEEDS = [int(s) for s in config["study"]["seeds"]]
# fail at parse time, naming the key, on a misspelt train or experiment setting
for _name, _exp in config["experiments"].items():
    resolve_train_config(config, {"name": _name, **_exp})


wildcard_constraints:
    experiment="|".join(EXPERIMENTS),
    seed=r"\d+",
    part=r"\d+",
    slide_id=r"[^/]+",


def manifest_source():
    """The user's manifest, or the generated demo manifest when manifest: demo."""
    if config["manifest"] == "demo":
        return f"{RESULTS}/demo/manifest.tsv"
    return config["manifest"]


def slide_ids(split=None):
    """Slide ids of the checked manifest (a checkpoint: known once it has run)."""
    path = checkpoints.manifest.get().output.manifest
    table = read_checked_manifest(path)
    if split:
        table = table[table["split"] == split]
    return list(table["slide_id"])


def tile_tables(wildcards):
    return expand(f"{RESULTS}/tiles/{{slide_id}}.parquet", slide_id=slide_ids())


def train_tables(wildcards):
    return expand(f"{RESULTS}/tiles/{{slide_id}}.parquet", slide_id=slide_ids("train"))


def tile_qc(wildcards):
    return expand(f"{RESULTS}/tiles/qc/{{slide_id}}.png", slide_id=slide_ids())


def experiment_settings(name):
    """An experiment's own switches (training merges them over `train:` itself)."""
    return {"mode": "mad", **config["experiments"][name]}


def experiment_mode(name):
    """The registry entry (madflow.modes) of an experiment's mode."""
    return get_mode(config["experiments"][name].get("mode"))


def experiment_train_config(name):
    """An experiment's resolved training settings (defaults, `train:`, its overrides)."""
    return resolve_train_config(config, {"name": name, **config["experiments"][name]})[
        1
    ]


def init_encoder(wildcards):
    """The encoder an experiment starts from (its `init` experiment, same seed), or none."""
    init = experiment_train_config(wildcards.experiment).get("init")
    if not init or not experiment_mode(wildcards.experiment).trains:
        return []
    return f"{RESULTS}/{init}/seed{wildcards.seed}/encoder.pt"


def init_argument(wildcards, input):
    return f"--init {input.init}" if input.init else ""


def embed_parts():
    """Slide ids per embed job: every slide, in manifest order, in parts of
    `embed.slides_per_job` (one job loads the encoder once for all its slides)."""
    ids = slide_ids()
    size = int(config["embed"].get("slides_per_job", 16))
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def part_tables(wildcards):
    ids = embed_parts()[int(wildcards.part)]
    return expand(f"{RESULTS}/tiles/{{slide_id}}.parquet", slide_id=ids)


def embeddings(wildcards):
    """The embed jobs' output folders of one experiment and seed (one per part)."""
    return expand(
        f"{RESULTS}/{wildcards.experiment}/seed{wildcards.seed}/embeddings/part{{part}}",
        part=range(len(embed_parts())),
    )


def encoder_input(wildcards):
    if not experiment_mode(wildcards.experiment).pretrain_job:
        return []
    return f"{RESULTS}/{wildcards.experiment}/seed{wildcards.seed}/encoder.pt"


def run_files(name, seeds):
    """A pretrain output of every experiment that has a pretrain job, for every seed."""
    return [
        f"{RESULTS}/{e}/seed{s}/{name}"
        for e in EXPERIMENTS
        if experiment_mode(e).pretrain_job
        for s in seeds
    ]


def seed_metrics(experiment, seeds):
    return [f"{RESULTS}/{experiment}/seed{s}/metrics.tsv" for s in seeds]


def train_logs(wildcards):
    return {
        e: f"{RESULTS}/{e}/seed{SEEDS[0]}/train_log.tsv"
        for e in EXPERIMENTS
        if experiment_mode(e).trains
    }


def pretrain_launcher(wildcards, resources):
    """torchrun with one process per GPU granted to the job, where the mode can run under
    DDP; else plain python (the supervised control is a small single-process run)."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1 and experiment_mode(wildcards.experiment).distributed:
        return f"torchrun --standalone --nproc_per_node={gpus}"
    return "python"
