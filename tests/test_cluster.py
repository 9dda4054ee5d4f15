"""Running on a cluster and a workstation: what each job asks for under the documented
override commands (Slurm profile, dry runs), GPUs bounded by --resources, and reruns only of
what an edit changes."""

import re
import shutil
from datetime import datetime
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, merged_config, run_snakemake

DOCS = (REPO / "docs" / "cluster.md").read_text()
# the override commands of docs/cluster.md, verbatim (the test fails if the docs drift)
SITE_DEFAULTS = "--default-resources slurm_partition=cpu slurm_account=mylab"
GPU_RULES = (
    "--set-resources pretrain:gpu=4 pretrain:gpu_model=h100 pretrain:slurm_partition=gpu"
    " embed:slurm_partition=gpu"
)


def job_resources(dry_run: str) -> dict[str, list[dict]]:
    """Per rule, the resources of each job a dry run lists."""
    jobs: dict[str, list[dict]] = {}
    for block in re.split(r"\n\s*\n", dry_run):
        rule = re.search(r"^(?:local)?(?:rule|checkpoint) (\w+):", block, flags=re.M)
        res = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if rule and res:
            pairs = dict(item.split("=", 1) for item in res.group(1).split(", "))
            jobs.setdefault(rule.group(1), []).append(pairs)
    return jobs


def scheduled(dry_run: str) -> set[str]:
    return set(re.findall(r"^(?:rule|checkpoint) (\w+):", dry_run, flags=re.M))


@pytest.fixture(scope="module")
def checked_workdir(tmp_path_factory):
    """The small demo with its manifest checkpoint done, and the Slurm profile beside it."""
    work = tmp_path_factory.mktemp("cluster")
    small = yaml.safe_load((REPO / "tests" / "config_small.yaml").read_text())
    (work / "config.yaml").write_text(yaml.safe_dump(merged_config(small)))
    shutil.copytree(REPO / "slurm", work / "slurm")
    run_snakemake(work, "manifest", "--cores", "2")
    return work


def test_documented_overrides_keep_every_rules_resources(checked_workdir):
    for command in (SITE_DEFAULTS, GPU_RULES):
        assert command in DOCS, command
    dry = run_snakemake(checked_workdir, "all", "-n", "--profile", "slurm",
                        *SITE_DEFAULTS.split(), *GPU_RULES.split()).stdout
    jobs = job_resources(dry)
    assert {"tile", "pretrain", "embed", "evaluate", "summary"} <= set(jobs)
    expected = {  # config.yaml resources:, then the overrides
        "tile": {"mem_mb": "4000", "runtime": "60", "slurm_partition": "cpu"},
        "pretrain": {"mem_mb": "64000", "runtime": "720", "gpu": "4", "gpu_model": "h100",
                     "cpus_per_gpu": "8", "slurm_partition": "gpu"},
        "embed": {"mem_mb": "16000", "runtime": "120", "gpu": "1", "cpus_per_gpu": "4",
                  "slurm_partition": "gpu"},
        "evaluate": {"mem_mb": "16000", "runtime": "120", "slurm_partition": "cpu"},
        "summary": {"mem_mb": "2000", "runtime": "30", "slurm_partition": "cpu"},
    }
    for rule, want in expected.items():
        for job in jobs[rule]:
            assert {k: job.get(k) for k in want} == want, (rule, job)
            assert job.get("slurm_account") == "mylab", (rule, job)
    assert all("gpu" not in job for job in jobs["tile"] + jobs["evaluate"])
    # 4 GPUs: one job, one torchrun process per GPU
    assert re.search(r"torchrun --standalone --nproc_per_node=4 -m madflow\.train .*--device auto", dry)


def test_embed_gpu_is_configurable(checked_workdir, tmp_path):
    override = tmp_path / "cpu_embed.yaml"
    override.write_text(yaml.safe_dump({"resources": {"embed": {"gpu": 0}}}))
    dry = run_snakemake(checked_workdir, "all", "-n", "-p", "--configfile", str(override)).stdout
    jobs = job_resources(dry)
    assert {job["gpu"] for job in jobs["embed"]} == {"0"}
    assert {job["gpu"] for job in jobs["pretrain"]} == {"1"}


def test_production_profile_keeps_site_values_only():
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    assert profile["keep-going"] is True
    # resources live in the rules: a command-line key would replace these whole
    assert not {"default-resources", "set-resources"} & set(profile)
    # the plugin's default status checks (sacct) keep failure reasons; squeue is the CI's
    assert not {"slurm-status-command", "slurm-init-seconds-before-status-checks"} & set(profile)
    ci = yaml.safe_load((REPO / ".ci" / "slurm-profile" / "config.yaml").read_text())
    assert ci["slurm-status-command"] == "squeue" and ci["executor"] == "slurm"


# -- a real run: encoders target, GPU bound, rerun triggers ---------------------------------
STAMP = r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\n"


def _when(stamp: str) -> datetime:
    return datetime.strptime(re.sub(" +", " ", stamp), "%a %b %d %H:%M:%S %Y")


def job_intervals(log_text: str, rules: set[str]) -> list[tuple[datetime, datetime]]:
    """(start, end) of each job of `rules` in a Snakemake log (1 s resolution), by start."""
    starts = {m.group(3): m.group(1) for m in re.finditer(
        STAMP + r"(?:local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)", log_text) if m.group(2) in rules}
    ends = re.finditer(STAMP + r"Finished jobid: (\d+) \(Rule: (\w+)\)", log_text)
    return sorted((_when(starts[m.group(2)]), _when(m.group(1))) for m in ends if m.group(3) in rules)


def edit_config(workdir, edit) -> str:
    """Apply edit(config) to the run's config.yaml; the dry run that follows."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    edit(config)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_snakemake(workdir, "-n").stdout


@pytest.mark.slow
def test_encoders_gpu_bound_and_rerun_triggers(tmp_path):
    config = merged_config(
        yaml.safe_load((REPO / "tests" / "config_small.yaml").read_text()),
        {"demo": {"n_slides": 3, "n_test": 1, "size": 1024}, "train": {"steps": 2},
         "evaluate": {"n_bootstrap": 20}},
    )
    config["experiments"] = {"mad": {}, "same_mag": {"mode": "same_mag"}, "color_stats": {"mode": "color_stats"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # `encoders` on a fresh directory trains every encoder and nothing downstream
    run_snakemake(tmp_path, "encoders", "--cores", "2")
    res = tmp_path / "results"
    assert (res / "mad" / "seed0" / "encoder.pt").exists() and (res / "same_mag" / "seed0" / "encoder.pt").exists()
    assert not list(res.glob("*/seed0/embeddings"))
    # a workstation with one GPU: one GPU job (embed) at a time, though 2 cores are free
    proc = run_snakemake(tmp_path, "--cores", "2", "--resources", "gpu=1")
    jobs = job_intervals(proc.stdout + proc.stderr, {"embed", "pretrain"})
    assert len(jobs) == 9, jobs  # 3 experiments x 3 slides
    assert all(later[0] >= earlier[1] for earlier, later in zip(jobs[:-1], jobs[1:])), jobs
    assert "Nothing to be done" in run_snakemake(tmp_path, "-n").stdout
    # an evaluation setting reruns evaluation and what follows it, never training or embedding
    jobs = scheduled(edit_config(tmp_path, lambda c: c["evaluate"].update(n_bootstrap=21)))
    assert "evaluate" in jobs and not jobs & {"train_config", "pretrain", "embed", "tile"}, jobs
    # one experiment's training setting retrains that experiment only
    dry = edit_config(tmp_path, lambda c: c["experiments"]["mad"].update(lr=5.0e-4))
    retrained = re.findall(r"rule pretrain:\n(?:    .*\n)*?    wildcards: experiment=(\w+)", dry)
    assert set(retrained) == {"mad"}, dry[-3000:]


# -- pretraining over several nodes: the job Slurm gets and the command it runs ----------------
def test_multi_node_pretraining_job(checked_workdir, tmp_path):
    """The 4 nodes x 8 GPUs recipe's cluster.yaml (docs/cluster.md, verbatim): the sbatch flags
    that the Slurm plugin's own functions make of each pretrain job's resources, and the
    launch line of its shell."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    recipe = re.search(r"cat > cluster\.yaml <<'EOF'\n(.*?)\nEOF\n", DOCS, flags=re.S).group(1)
    assert yaml.safe_load(recipe)["resources"]["pretrain"] == {"nodes": 4, "gpu": 8, "cpus_per_gpu": 8,
                                                               "mem_mb": 480000, "runtime": 2880}
    override = tmp_path / "cluster.yaml"
    override.write_text(recipe)
    dry = run_snakemake(checked_workdir, "all", "-n", "-p", "--profile", "slurm", "--configfile",
                        str(override)).stdout
    jobs = job_resources(dry)
    assert jobs["pretrain"] and all(job["nodes"] == "4" for job in jobs["pretrain"])

    class Resources(dict):
        __getattr__ = dict.__getitem__

    for job in jobs["pretrain"]:
        res = Resources({k: int(v) if v.isdigit() else v for k, v in job.items()})
        fake_job = SimpleNamespace(resources=res, threads=2)
        params = {"run_uuid": "run", "slurm_logfile": "job.log", "comment_str": "rule_pretrain", "account": "",
                  "partition": "", "workdir": "."}
        flags = (get_submit_command(fake_job, params) + set_gres_string(fake_job)).split()
        # 4 nodes, one task (a torchrun agent) on each, 8 GPUs and 64 CPUs on each
        assert {"--nodes=4", "--ntasks=4", "--gres=gpu:8", "--cpus-per-gpu=8"} <= set(flags), flags
        assert not [f for f in flags if f.startswith(("--gpus", "--ntasks-per-gpu", "--cpus-per-task"))], flags
        assert flags[flags.index("--mem") + 1] == "480000" and flags[flags.index("-t") + 1] == "2880"
    srun = ("srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1"
            " torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID"
            ' --rdzv_endpoint="$(scontrol show hostnames "$(squeue -h -j $SLURM_JOB_ID -o %N)" | head -n 1)'
            ':$((29500 + SLURM_JOB_ID % 1000))" --max_restarts=0')
    # every DDP experiment over the 4 nodes; the supervised control, one process, on the first
    launch = dict(re.findall(r"rule pretrain:\n(?:    .*\n)*?    wildcards: experiment=(\w+)[^\n]*\n(?:.*\n)*?"
                             r"(?:^\s*|Shell command: )(srun .*?|torchrun .*?|python) -m madflow\.train", dry,
                             flags=re.M))
    assert launch["base"] == launch["mad"] == srun and launch["supervised"] == "python", launch


def test_nodes_from_the_command_line_alone_are_refused(checked_workdir):
    """`nodes` must come from a config file (the rule derives the job's tasks and GPUs from it
    when it is parsed); a command-line `nodes` alone would hold N nodes and train on one."""
    proc = run_snakemake(checked_workdir, "all", "-n", "-p", "--set-resources", "pretrain:nodes=2", check=False)
    assert proc.returncode != 0
    assert "set resources.pretrain.nodes in a config file" in proc.stdout + proc.stderr
