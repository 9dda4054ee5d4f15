"""The per-rule environments of `--use-conda`: envs/core.yaml (no torch) and envs/torch.yaml.

Conda channels cannot be reached where these tests run, so what is proved is:
- (fast) every rule that runs code names one of the two envs; the light rules name core,
  which has no torch; torch.yaml is core.yaml plus torch, torchvision and timm; no env
  installs madflow (no `-e`, no path), which conda could not resolve from the copy of the
  env file Snakemake builds from;
- (slow) the whole workflow runs with madflow NOT installed: the light rules in a plain venv
  holding only core.yaml's pins (pip) plus the workflow engine (snakemake), the torch rules
  in a venv that reuses this environment's installed packages (torch is ~5 GB) but not its
  madflow install. So core.yaml is shown complete; for torch.yaml the test shows that its
  rules need no installed madflow, and its completeness rests on core.yaml being complete
  and on torch.yaml = core.yaml + the torch pins (checked here).
The core venv is cached by the hash of envs/core.yaml (MADFLOW_ENV_CACHE, default
~/.cache/madflow/env-venvs): the first run builds it (~3 min on 2 cores).
"""

import hashlib
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import REPO, merged_config

LIGHT_RULES = {"demo_slides", "manifest", "tile", "train_config", "evaluate", "experiment_metrics",
               "summary", "multiseed_summary", "figures", "benchmark_table"}
TORCH_PINS = {"torch", "torchvision", "timm"}


def rule_envs() -> dict[str, str]:
    """rule name -> env file, for every rule that runs code."""
    text = "".join(p.read_text() for p in sorted((REPO / "rules").glob("*.smk")))
    envs = {}
    for block in re.split(r"^(?=(?:rule|checkpoint) \w+:)", text, flags=re.M):
        name = re.match(r"(?:rule|checkpoint) (\w+):", block)
        if name and re.search(r"^\s+(?:script|shell|run):", block, flags=re.M):
            env = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.-]+\.yaml)"', block)
            assert env, f"rule {name.group(1)} runs code without a conda env"
            envs[name.group(1)] = env.group(1)
    return envs


def pip_specs(env_path: Path) -> list[str]:
    """An env file's pins as pip requirements (conda `name=version` -> `name==version`)."""
    specs = []
    for dep in yaml.safe_load(env_path.read_text())["dependencies"]:
        if isinstance(dep, dict):
            specs += dep["pip"]
        elif not re.match(r"^(python|pip)=", dep):
            specs.append(dep.replace("=", "=="))
    return specs


def test_rules_name_the_split_envs():
    envs = rule_envs()
    assert LIGHT_RULES <= set(envs), LIGHT_RULES - set(envs)
    assert {envs[r] for r in LIGHT_RULES} == {"envs/core.yaml"}
    assert {envs[r] for r in ("pretrain", "embed", "export_features")} == {"envs/torch.yaml"}
    core, torch = pip_specs(REPO / "envs" / "core.yaml"), pip_specs(REPO / "envs" / "torch.yaml")
    names = lambda specs: {s.split("==")[0].lower() for s in specs}  # noqa: E731
    assert not names(core) & TORCH_PINS
    assert set(torch) - set(core) == {s for s in torch if s.split("==")[0] in TORCH_PINS}
    assert set(core) <= set(torch) and names(torch) >= TORCH_PINS
    for spec in core + torch:  # exact pins only: no editable or path installs
        assert re.match(r"^[A-Za-z0-9_.-]+==[\w.]+$", spec), spec


def _clean_env(venv_bin: Path) -> dict:
    """This process's environment without any way to import madflow but the workflow's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    keep = [p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "python").exists()]
    env["PATH"] = os.pathsep.join([str(venv_bin), *keep])
    return env


def _core_venv() -> Path:
    """A venv with core.yaml's pins and the workflow engine, cached by the env file's hash."""
    env_file = REPO / "envs" / "core.yaml"
    engine = next(line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.startswith("snakemake=="))
    key = hashlib.sha256(env_file.read_bytes() + engine.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("MADFLOW_ENV_CACHE", Path.home() / ".cache" / "madflow" / "env-venvs"))
    venv = cache / f"core-{key}"
    if not (venv / "ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pip_specs(env_file), engine],
                       check=True, timeout=1800)
        (venv / "ready").write_text(engine + "\n")
    return venv


def _torch_venv(tmp_path) -> Path:
    """A venv reusing this environment's packages by path (not its .pth files, so not the
    editable madflow install)."""
    venv = tmp_path / "torch-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "reuse_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _snakemake(venv: Path, workdir: Path, *args) -> str:
    cmd = [str(venv / "bin" / "python"), "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_clean_env(venv / "bin"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


@pytest.mark.slow
def test_every_rule_runs_without_madflow_installed(tmp_path):
    core, torch = _core_venv(), _torch_venv(tmp_path)
    for venv in (core, torch):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import madflow"], capture_output=True,
                               text=True, env=_clean_env(venv / "bin"), cwd=tmp_path)
        assert probe.returncode != 0 and "No module named 'madflow'" in probe.stderr, venv
    probe = subprocess.run([str(core / "bin" / "python"), "-c", "import torch"], capture_output=True,
                           env=_clean_env(core / "bin"), cwd=tmp_path)
    assert probe.returncode != 0, "torch is importable in the core venv"
    work = tmp_path / "run"
    work.mkdir()
    config = merged_config(
        yaml.safe_load((REPO / "tests" / "config_small.yaml").read_text()),
        {"demo": {"n_slides": 3, "n_test": 1, "size": 1024}, "train": {"steps": 2},
         "evaluate": {"n_bootstrap": 20}},
    )
    config["experiments"] = {"mad": {}, "color_stats": {"mode": "color_stats"}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    logs = _snakemake(core, work, "tiles", "results/mad/train_config.json", "--cores", "2")
    logs += _snakemake(torch, work, "encoders", "features", "results/mad/provenance.json",
                       "results/color_stats/provenance.json", "--cores", "2")
    logs += _snakemake(core, work, "report", "--cores", "2")  # fails if it needed a torch job
    # the report is the engine's own (no rule runs): this environment's snakemake writes it
    _snakemake(Path(sys.executable).parent.parent, work, "--report", "results/report.html")
    ran = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", logs, flags=re.M))
    assert set(rule_envs()) - {"multiseed_summary"} <= ran, set(rule_envs()) - ran
    res = work / "results"
    assert (res / "report.html").stat().st_size > 10000
    assert len(list((res / "mad" / "seed0" / "features" / "10x" / "pt_files").glob("*.pt"))) == 3
    provenance = yaml.safe_load((res / "mad" / "provenance.json").read_text())
    assert provenance["packages"]["torch"] and provenance["git_commit"]
