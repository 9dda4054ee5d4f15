# Helpers shared by the rules (the only place for Python functions, per snakemake --lint).
import json
import shlex
from pathlib import Path

from snakemake.utils import validate

from madflow.config import resolve_train_config
from madflow.labels import label_files
from madflow.manifest import (
    SLIDE_ID_PATTERN,
    file_fingerprint,
    input_files,
    read_checked_manifest,
    require_split,
)
from madflow.modes import get_mode
from madflow.features import trident_folder
from madflow.slides import mag_str
from madflow.timm_names import unknown_archs

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
# TRIDENT's job folder per magnification (snakemake features, docs/slides.md)
TRIDENT_FOLDERS = [trident_folder(m, config["tiling"]["tile_px"]) for m in MAGS]
# per-job requests (mem_mb, runtime, gpu, cpus_per_gpu) of each rule, from config `resources:`;
# rules without an entry get `default` (docs/cluster.md)
RESOURCES = config["resources"]
EXPERIMENTS = list(config["experiments"])
SEEDS = [int(s) for s in config["train"]["seeds"]]
STUDY_SEEDS = [int(s) for s in config["study"]["seeds"]]
# fail at parse time, naming the key, on a misspelt train or experiment setting
for _name, _exp in config["experiments"].items():
    resolve_train_config(config, {"name": _name, **_exp})
# ... and on an architecture timm does not know, before any slide is tiled
_unknown_archs = unknown_archs(config)
if _unknown_archs:
    raise ValueError(
        f"unknown timm architecture(s): {'; '.join(_unknown_archs)} "
        "(timm.list_models() lists the known names)"
    )


wildcard_constraints:
    experiment="|".join(EXPERIMENTS),
    seed=r"\d+",
    part=r"\d+",
    slide_id=SLIDE_ID_PATTERN,


def manifest_source():
    """The user's manifest, or the generated demo manifest when manifest: demo."""
    if config["manifest"] == "demo":
        return f"{RESULTS}/demo/manifest.tsv"
    return config["manifest"]


def manifest_input_files():
    """The slide and label files of the user's manifest: inputs of the manifest stage, so that
    changing one re-checks it. The demo's slides are the demo rule's own business."""
    if config["manifest"] == "demo":
        return []
    return input_files(config["manifest"])


MANIFEST_INPUT_FILES = manifest_input_files()


def manifest_input_fingerprints():
    """Size and mtime of every input file of the manifest stage: a replacement by an older
    copy (cp -p, rsync -a), which mtime comparison misses, still changes this parameter and
    reruns the stage. (Computed at parse time: Snakemake ignores parameters derived from
    `input` when it looks for changed parameters.)"""
    return {path: file_fingerprint(path) for path in MANIFEST_INPUT_FILES}


_CHECKED = {}


def checked_manifest():
    """The checked manifest (a checkpoint: known once it has run), read once per version."""
    path = checkpoints.manifest.get().output.manifest
    key = (path, file_fingerprint(path))
    if key not in _CHECKED:
        _CHECKED.clear()
        table = read_checked_manifest(path)
        _CHECKED[key] = table.set_index("slide_id", drop=False)
    return _CHECKED[key]


def slide_ids():
    return list(checked_manifest()["slide_id"])


def split_slide_ids(split, needed_by):
    """Slide ids of one split; a clear error, before any job needs them, when there is none."""
    return require_split(
        checked_manifest(), split, needed_by, f"{RESULTS}/manifest.tsv"
    )


# manifest columns that do not change a slide's tiles (a new split must not retile it)
NOT_TILING_COLUMNS = ["split", "split_source"]


def slide_row(wildcards):
    """What tiling one slide depends on: its checked manifest row, file fingerprints
    included, so that a changed slide or label file reruns that slide's tiles only."""
    return checked_manifest().loc[wildcards.slide_id].drop(NOT_TILING_COLUMNS).to_dict()


def slide_files(wildcards):
    row = checked_manifest().loc[wildcards.slide_id]
    return {
        "slide": row["path"],
        "labels": label_files(row["labels"]) if row["labels"] else [],
    }


def slide_class_map(wildcards):
    """The part of config `classes:` that renames this slide's classes."""
    in_file = checked_manifest().loc[wildcards.slide_id, "classes_in_file"].split(",")
    return {k: v for k, v in config["classes"].items() if k in in_file}


def tile_tables(wildcards):
    return expand(f"{RESULTS}/tiles/{{slide_id}}.parquet", slide_id=slide_ids())


def train_tables(wildcards):
    return expand(
        f"{RESULTS}/tiles/{{slide_id}}.parquet",
        slide_id=split_slide_ids("train", "pretraining"),
    )


def tile_qc(wildcards):
    return expand(f"{RESULTS}/tiles/qc/{{slide_id}}.png", slide_id=slide_ids())


def default_experiments():
    """The experiments of the default target: config `default_experiments` (every experiment
    when null) and the stages they start from (`init`), in config order."""
    chosen = config.get("default_experiments") or EXPERIMENTS
    unknown = sorted(set(chosen) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(
            f"default_experiments names {unknown}, which are not under experiments: "
            f"(have {EXPERIMENTS})"
        )
    needed = set()
    for name in chosen:
        while name and name not in needed:
            needed.add(name)
            name = experiment_train_config(name).get("init")
    return [e for e in EXPERIMENTS if e in needed]


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
    return f"--init {shlex.quote(input.init)}" if input.init else ""


def embed_parts():
    """Slide ids per embed job: every slide, in manifest order, in parts of
    `embed.slides_per_job` (one job loads the encoder once for all its slides)."""
    ids = slide_ids()
    size = int(config["embed"].get("slides_per_job", 16))
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def part_tables(wildcards):
    ids = embed_parts()[int(wildcards.part)]
    return expand(f"{RESULTS}/tiles/{{slide_id}}.parquet", slide_id=ids)


def embedding_part(wildcards):
    """The embed job's folder that holds one slide's embeddings."""
    part = next(k for k, ids in enumerate(embed_parts()) if wildcards.slide_id in ids)
    return (
        f"{RESULTS}/{wildcards.experiment}/seed{wildcards.seed}/embeddings/part{part}"
    )


def embeddings(wildcards):
    """The embed jobs' output folders of one experiment and seed (one per part)."""
    split_slide_ids("test", "evaluation")
    return expand(
        f"{RESULTS}/{wildcards.experiment}/seed{wildcards.seed}/embeddings/part{{part}}",
        part=range(len(embed_parts())),
    )


def encoder_input(wildcards):
    if not experiment_mode(wildcards.experiment).pretrain_job:
        return []
    return f"{RESULTS}/{wildcards.experiment}/seed{wildcards.seed}/encoder.pt"


def run_files(name, experiments, seeds):
    """A pretrain output of each experiment that has a pretrain job, for every seed."""
    return [
        f"{RESULTS}/{e}/seed{s}/{name}"
        for e in experiments
        if experiment_mode(e).pretrain_job
        for s in seeds
    ]


def seed_metrics(experiment, seeds):
    return [f"{RESULTS}/{experiment}/seed{s}/metrics.tsv" for s in seeds]


def train_logs(wildcards):
    return {
        e: f"{RESULTS}/{e}/seed{SEEDS[0]}/train_log.tsv"
        for e in DEFAULT_EXPERIMENTS
        if experiment_mode(e).trains
    }


def rule_threads(name):
    """A rule's threads (Snakemake sets OMP_NUM_THREADS to them): config threads.<name>."""
    return int(config["threads"].get(name, 1))


def rule_resources(name):
    """A rule's requests: config resources.<name> over resources.default."""
    return {**RESOURCES["default"], **RESOURCES.get(name, {})}


def pretrain_resources():
    """config resources.pretrain. With `nodes: N` > 1 they become one Slurm job of N nodes with
    one task each, in the Slurm executor plugin's own terms: `tasks` with an `mpi` launcher
    (the plugin then runs the rule's shell in the batch script, whose `srun` starts a torchrun
    agent per node, instead of wrapping the whole job in `srun -n1`), `tasks_per_gpu: 0` (no
    --ntasks-per-gpu) and the GPUs per node as `gres` (--gres counts per node; the plugin's
    `gpu` is --gpus, a count for the whole job)."""
    res = rule_resources("pretrain")
    nodes = int(res.get("nodes", 1))
    if nodes > 1:
        gpus = int(res.pop("gpu", 0) or 0)
        res.update(tasks=nodes, mpi="srun", tasks_per_gpu=0)
        if gpus:
            res["gres"] = f"gpu:{gpus}"
    return res


def job_gpus(resources):
    """GPUs granted to a job, per node: its `gpu`, or the count of its `gres` (gpu:G)."""
    gres = str(resources.get("gres", "") or "")
    if gres.startswith("gpu"):
        return int(gres.rsplit(":", 1)[1]) if ":" in gres else 1
    return int(resources.get("gpu", 0) or 0)


def job_device(wildcards, resources):
    """'cpu' for a job granted no GPU (even where one is visible), else 'auto' (CUDA if any)."""
    return "auto" if job_gpus(resources) > 0 else "cpu"


def training_config(wildcards):
    """What pretraining reads (model, train, tiling and the experiment's own settings):
    the params of train_config, so that only a change to these retrains an experiment.
    """
    train = {k: v for k, v in config["train"].items() if k != "seeds"}
    names = [wildcards.experiment]
    init = experiment_train_config(wildcards.experiment).get("init")
    if init:  # its encoder is an input; its entry names the stage the run starts from
        names.append(init)
    return {
        "model": config["model"],
        "train": train,
        "tiling": config["tiling"],
        "experiments": {name: config["experiments"][name] for name in names},
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


DEFAULT_EXPERIMENTS = default_experiments()


def pretrain_launcher(wildcards, resources, threads):
    """How the pretrain job starts its processes. One node: torchrun --standalone with one
    process per GPU granted (plain python for one GPU, a CPU job, or the supervised control,
    a small single-process run). Several nodes (pretrain_resources): srun starts one torchrun
    agent per node; the agents meet at a c10d rendezvous on the job's first node, with the job
    id as rendezvous id, and form one process group of nodes x GPUs processes (CPU nodes: one
    process per node). A dying task ends the whole step (--kill-on-bad-exit). The node list
    comes from squeue: the plugin's job step hands the rule's shell the job id but not
    SLURM_JOB_NODELIST (it drops the allocation's SLURM_* variables before a nested srun).
    """
    gpus = job_gpus(resources)
    nodes = int(resources.get("nodes", 1) or 1)
    if not experiment_mode(wildcards.experiment).distributed:
        return "python"  # on the job's first node (a multi-node job's batch script runs there)
    if nodes > 1:
        if resources.get("mpi") != "srun":
            raise ValueError(
                "pretraining over several nodes: set resources.pretrain.nodes in a config"
                " file; --set-resources pretrain:nodes=N alone does not make a multi-node job"
            )
        per_node = max(gpus, 1)
        cpus = gpus * int(resources.get("cpus_per_gpu", 1)) if gpus else threads
        return (
            f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --cpus-per-task={cpus}"
            f" --kill-on-bad-exit=1 torchrun --nnodes={nodes} --nproc_per_node={per_node}"
            " --rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID --rdzv_endpoint="
            '"$(scontrol show hostnames "$(squeue -h -j $SLURM_JOB_ID -o %N)" | head -n 1)'
            ':$((29500 + SLURM_JOB_ID % 1000))" --max_restarts=0'
        )
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node={gpus}"
    return "python"
