# Helpers shared by the rules (the only place for Python functions, per snakemake --lint).
import json
import shlex
from pathlib import Path

from snakemake.utils import validate

from madflow.config import resolve_train_config
from madflow.manifest import read_checked_manifest
from madflow.modes import get_mode
from madflow.slides import mag_str

validate(config, "../schemas/config.schema.yaml")

# madflow is imported from the workflow's own folder, never installed into a rule's env:
# script jobs find it on Snakemake's search path (the Snakefile's folder), shell jobs
# (pretrain: python -m madflow.train) through PYTHONPATH
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}"
    "${{PYTHONPATH:+:$PYTHONPATH}}; "
)

RESULTS = "results"
MAGS = sorted(float(m) for m in config["tiling"]["magnifications"])
MAG_NAMES = [mag_str(m) for m in MAGS]
# per-job requests (mem_mb, runtime, gpu, cpus_per_gpu) of each rule, from config `resources:`;
# rules without an entry get `default` (docs/cluster.md)
RESOURCES = config["resources"]
EXPERIMENTS = list(config["experiments"])
SEEDS = [int(s) for s in config["train"]["seeds"]]
STUDY_SEEDS = [int(s) for s in config["study"]["seeds"]]
# fail at parse time, naming the key, on a misspelt train or experiment setting
for _name, _exp in config["experiments"].items():
    resolve_train_config(config, {"name": _name, **_exp})


wildcard_constraints:
    experiment="|".join(EXPERIMENTS),
    seed=r"\d+",
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


def embeddings(wildcards):
    return expand(
        f"{RESULTS}/{wildcards.experiment}/seed{wildcards.seed}/embeddings/{{slide_id}}.h5",
        slide_id=slide_ids(),
    )


def encoder_input(wildcards):
    if not experiment_mode(wildcards.experiment).pretrain_job:
        return []
    return f"{RESULTS}/{wildcards.experiment}/seed{wildcards.seed}/encoder.pt"


def seed_metrics(experiment, seeds):
    return [f"{RESULTS}/{experiment}/seed{s}/metrics.tsv" for s in seeds]


def train_logs(wildcards):
    return {
        e: f"{RESULTS}/{e}/seed{SEEDS[0]}/train_log.tsv"
        for e in EXPERIMENTS
        if experiment_mode(e).trains
    }


def rule_resources(name):
    """A rule's requests: config resources.<name> over resources.default."""
    return {**RESOURCES["default"], **RESOURCES.get(name, {})}


def job_device(wildcards, resources):
    """'cpu' for a job granted no GPU (even where one is visible), else 'auto' (CUDA if any)."""
    return "auto" if int(resources.get("gpu", 0) or 0) > 0 else "cpu"


def training_config(wildcards):
    """What pretraining reads (model, train, tiling and the experiment's own settings):
    the params of train_config, so that only a change to these retrains an experiment.
    """
    train = {k: v for k, v in config["train"].items() if k != "seeds"}
    return {
        "model": config["model"],
        "train": train,
        "tiling": config["tiling"],
        "experiments": {
            wildcards.experiment: config["experiments"][wildcards.experiment]
        },
    }


def provenance_config(wildcards):
    """The resolved config, less where jobs run (resources): recorded, never a training input."""
    return {k: v for k, v in config.items() if k != "resources"}


def encoders(wildcards):
    """Every encoder that pretraining writes: experiments with a pretrain job, train seeds."""
    return [
        f"{RESULTS}/{e}/seed{s}/encoder.pt"
        for e in EXPERIMENTS
        if experiment_mode(e).pretrain_job
        for s in SEEDS
    ]


def exported_features(wildcards):
    return expand(
        f"{RESULTS}/{{experiment}}/seed{{seed}}/features/{{mag}}x/h5_files/{{slide_id}}.h5",
        experiment=EXPERIMENTS,
        seed=SEEDS,
        mag=MAG_NAMES,
        slide_id=slide_ids(),
    )


def pretrain_launcher(wildcards, resources):
    """torchrun with one process per GPU granted to the job, where the mode can run under
    DDP; else plain python (the supervised control is a small single-process run)."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1 and experiment_mode(wildcards.experiment).distributed:
        return f"torchrun --standalone --nproc_per_node={gpus}"
    return "python"
