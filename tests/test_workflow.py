"""End-to-end runs of the workflow on a small demo, and its static checks (targets, envs)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from conftest import REPO, merged_config, run_snakemake

MAGS = ["2.5", "10", "40"]


def test_target_rules_include_every_experiment(workdir):
    out = run_snakemake(workdir, "--list-target-rules").stdout.split()
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for name in config["experiments"]:
        assert f"exp_{name}" in out
    for target in ("all", "tiles", "figures", "report", "study", "multiseed"):
        assert target in out


def test_new_experiment_gets_a_target_without_code_change(workdir):
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"]["mad_long"] = {"steps": 12}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    assert "exp_mad_long" in run_snakemake(workdir, "--list-target-rules").stdout.split()


def test_exp_target_builds_only_its_chain(workdir):
    run_snakemake(workdir, "--cores", "2", "manifest")  # resolve the checkpoint first
    dry = run_snakemake(workdir, "-n", "--cores", "2", "exp_shuffled").stdout
    jobs = re.findall(r"^rule (\w+):", dry, flags=re.M)
    assert "pretrain" in jobs and "evaluate" in jobs
    wildcards = re.findall(r"experiment=(\w+)", dry)
    assert set(wildcards) == {"shuffled", "base"}  # stage 2 starts from stage 1
    # with 2 GPUs MAD-style training is launched by torchrun; the supervised control is one process
    proc = run_snakemake(workdir, "exp_shuffled", "exp_supervised", "-n", "-p", "--cores", "2",
                         "--set-resources", "pretrain:gpu=2")
    launch = re.findall(r"(torchrun|python) [^\n]*-m madflow\.train [^\n]*--experiment (\w+)",
                        proc.stdout + proc.stderr)
    assert re.search(r"--experiment shuffled [^\n]*--init results/base/seed0/encoder\.pt", proc.stdout + proc.stderr)
    assert {e: cmd for cmd, e in launch} == {"shuffled": "torchrun", "base": "torchrun", "supervised": "python"}


def test_default_target_runs_its_experiments_and_study_every_one_over_the_seeds(workdir):
    run_snakemake(workdir, "--cores", "2", "manifest")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    pretrained = re.compile(r"^rule pretrain:.*?wildcards: experiment=(\w+), seed=(\d+)", flags=re.M | re.S)
    default = set(pretrained.findall(run_snakemake(workdir, "-n", "--cores", "2").stdout))
    assert {e for e, _ in default} == {"base", "mad", "shuffled", "random_init", "supervised"}
    assert {s for _, s in default} == {str(s) for s in config["train"]["seeds"]}
    study = set(pretrained.findall(run_snakemake(workdir, "-n", "--cores", "2", "study").stdout))
    trained = {e for e, v in config["experiments"].items() if v.get("mode") != "color_stats"}
    assert study == {(e, str(s)) for e in trained for s in config["study"]["seeds"]}
    # a stage-2 experiment brings the stage it starts from into the default run
    config["default_experiments"] = ["interp"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    default = set(pretrained.findall(run_snakemake(workdir, "-n", "--cores", "2").stdout))
    assert {e for e, _ in default} == {"base", "interp"}
    config["default_experiments"] = ["nonesuch"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(workdir, "-n", "--cores", "2", check=False)
    assert proc.returncode != 0 and "default_experiments names ['nonesuch']" in proc.stdout + proc.stderr


def test_tiles_end_to_end(workdir):
    run_snakemake(workdir, "--cores", "2", "tiles")
    res = workdir / "results"
    manifest = pd.read_csv(res / "manifest.tsv", sep="\t")
    assert len(manifest) == 4 and set(manifest["split"]) == {"train", "test"}
    assert (manifest["vendor"] == "aperio").all() and (manifest["base_mag"] == 40).all()
    for slide in manifest["slide_id"]:
        table = pd.read_parquet(res / "tiles" / f"{slide}.parquet")
        counts = table.groupby("mag").size()
        assert counts[10.0] == 16 * counts[2.5] and counts[40.0] == 16 * counts[10.0]
        assert table["native"].all()
        assert table["label"].notna().any() and 0 < table["tissue"].mean() < 1
        assert (res / "tiles" / "qc" / f"{slide}.png").stat().st_size > 1000
        for mag in MAGS:
            with h5py.File(res / "tiles" / "coords" / f"{mag}x" / f"{slide}.h5") as h5:
                coords = h5["coords"]
                assert coords.attrs["patch_size"] == 64
                assert len(coords) == int(table[(table["mag"] == float(mag)) & table["tissue"]].shape[0])
    assert (res / "logs" / "tile").is_dir()
    assert len(list((res / "benchmarks" / "tile").glob("*.tsv"))) == 4


@pytest.mark.e2e
def test_whole_chain_end_to_end(workdir):
    """`snakemake --cores 2` and `snakemake --report` on the small demo: every metric, figure and
    provenance record exists and is well-formed."""
    run_snakemake(workdir, "--cores", "2")
    res = workdir / "results"
    # the demo profile reads what the run left: every stage's CPU share and the run's wall time
    profile = subprocess.run([sys.executable, str(REPO / "bench" / "profile_demo.py"), str(res)],
                             capture_output=True, text=True, check=True).stdout
    shares = dict(re.findall(r"^\s*([a-z][a-z ]*?)\s+\d+\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)$", profile, flags=re.M))
    assert {"training", "embedding", "evaluation", "tiling"} <= set(shares), profile
    assert abs(sum(float(v) for v in shares.values()) - 1) < 0.01, profile
    assert 0 < float(re.search(r"training steps: ([0-9.]+)% of the CPU time", profile).group(1)) < 100
    assert re.search(r"run wall time .* 1 invocation\(s\), summed\): [0-9.]+ min", profile), profile
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    experiments = config["default_experiments"]
    summary = pd.read_csv(res / "summary.tsv", sep="\t")
    assert sorted(summary["experiment"]) == sorted(experiments)
    checks = pd.read_csv(res / "benchmark_checks.tsv", sep="\t").set_index("experiment")
    assert checks.loc["same_mag_scratch", "passed"].startswith("not run")  # a study experiment, said so
    assert checks.loc["supervised", "passed"] in ("True", "False")
    for exp in experiments:
        metrics = pd.read_csv(res / exp / "metrics.tsv", sep="\t")
        assert list(metrics.columns[:7]) == [
            "experiment", "encoder", "metric", "scope", "value", "ci_low", "ci_high"
        ]
        assert {"seed", "note"} <= set(metrics.columns)
        got = set(zip(metrics["metric"], metrics["scope"]))
        pairs = [f"{a}->{b}" for a in MAGS for b in MAGS]
        expected = {("probe_ba", p) for p in pairs} | {("retention_cc", p) for p in pairs}
        expected |= {("ami", s) for s in ["global", *MAGS]} | {("mag_leakage", "global")}
        expected |= {("delta_hier", p) for p in ["2.5->10", "10->40", "2.5->40"]}
        expected |= {("seg_miou", m) for m in MAGS}
        expected |= {(name, p) for name in ("mag_offset", "mag_offset_spread") for p in ["2.5->10", "10->40"]}
        assert expected <= got, expected - got
        ba = metrics[metrics["metric"] == "probe_ba"]["value"]
        assert ba.between(0, 1).all()
        prov = json.loads((res / exp / "provenance.json").read_text())
        assert prov["git_commit"] and prov["packages"]["torch"]
    figs = (res / "figures" / "figures.done").read_text().split()
    names = {Path(f).stem for f in figs}
    for name in ["retention_bars", "clustering_bars", "delta_hier", "training_curves", "tiling_qc"]:
        assert name in names
    for exp in experiments:
        assert {f"probe_heatmap_{exp}", f"embedding_map_{exp}", f"segmentation_{exp}"} <= names
    for f in figs:
        assert (workdir / f).stat().st_size > 2000
    run_snakemake(workdir, "--cores", "1", "report")
    run_snakemake(workdir, "--report", "results/report.html")
    html = (res / "report.html").read_text(errors="ignore")
    assert "retention_bars" in html and "summary.tsv" in html


def test_bad_slide_error_mode_stops_the_run(workdir, tmp_path):
    """A manifest with a truncated slide stops at the manifest rule with the slide named."""
    from madflow.synth import make_slide

    good = tmp_path / "good.svs"
    make_slide(good, seed=1, size=1024)
    (tmp_path / "bad.svs").write_bytes(good.read_bytes()[:5000])
    table = tmp_path / "slides.tsv"
    table.write_text("slide_id\tpath\ngood\tgood.svs\nbad\tbad.svs\n")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["manifest"] = str(table)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(workdir, "--cores", "1", "tiles", check=False)
    assert proc.returncode != 0
    log = (workdir / "results" / "logs" / "manifest.log").read_text()
    assert "bad:" in log and "truncated" in log
    config["bad_slides"] = "skip"
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(workdir, "--cores", "1", "tiles")
    rejected = pd.read_csv(workdir / "results" / "manifest_rejected.tsv", sep="\t")
    assert list(rejected["slide_id"]) == ["bad"]
    assert (workdir / "results" / "tiles" / "good.parquet").exists()


def test_envs_match_project_pins():
    """Every rule has a conda env; every env parses; its pins equal requirements.txt's."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    rules_text = "".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    blocks = re.split(r"^(?=(?:rule|checkpoint) \w+:)", rules_text, flags=re.M)
    envs = []
    for block in blocks:
        if re.search(r"^\s+(?:script|shell|run):", block, flags=re.M):  # a rule that runs code
            env = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.]+\.yaml)"', block)
            assert env, f"rule without a conda: env:\n{block[:200]}"
            envs.append(env.group(1))
    assert len(envs) >= 10
    conda_names = {"pyyaml": "pyyaml", "pillow": "pillow"}
    for env_path in set(envs):
        env = yaml.safe_load((REPO / env_path).read_text())
        assert "conda-forge" in env["channels"] and "nodefaults" in env["channels"]
        for dep in env["dependencies"]:
            entries = dep["pip"] if isinstance(dep, dict) else [dep]
            for entry in entries:
                m = re.match(r"^([\w.-]+)\s*==?\s*([\w.]+)$", entry)
                if not m or m.group(1) in ("python", "pip"):
                    continue
                name = conda_names.get(m.group(1), m.group(1)).lower()
                assert name in pins, f"{env_path}: {name} is not pinned in requirements.txt"
                assert pins[name] == m.group(2), f"{env_path}: {name}={m.group(2)} vs {pins[name]}"
