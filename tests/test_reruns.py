"""Reruns do exactly what a changed input needs (checked with dry runs), recovery after a kill
works as documented, and errors come before the jobs that would hit them. Tiny slides."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, run_snakemake
from test_input_checks import _geojson, _slide

SQUARES = [(0, 0, 512, "tumor"), (512, 0, 512, "stroma")]


def _set_config(workdir, **changes):
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def slides(workdir):
    """Three 1024 px slides with GeoJSON labels (two train, one test) as the manifest."""
    rows = ["slide_id\tpath\tlabels\tsplit"]
    for n, split in enumerate(["train", "train", "test"]):
        _slide(workdir / f"s{n}.svs")
        _geojson(workdir / f"s{n}.geojson", SQUARES)
        rows.append(f"s{n}\ts{n}.svs\ts{n}.geojson\t{split}")
    (workdir / "slides.tsv").write_text("\n".join(rows) + "\n")
    _set_config(workdir, manifest="slides.tsv")
    return workdir


def _planned(workdir, *targets):
    """(rules, tiled slide ids) of a dry run."""
    out = run_snakemake(workdir, "-n", "--cores", "1", *targets).stdout
    rules = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", out, flags=re.M))
    tiled = set(re.findall(r"^(?:local)?rule tile:\n(?:\s+\w+:.*\n)*?\s+wildcards: slide_id=(\S+)", out, flags=re.M))
    return rules, tiled, out


def test_changed_slide_label_or_setting_reruns_exactly_its_jobs(slides):
    run_snakemake(slides, "--cores", "2", "tiles")
    assert _planned(slides, "tiles")[0] == set()
    # a corrected label file: the manifest re-checks it, then only that slide is retiled
    _geojson(slides / "s1.geojson", [(0, 0, 256, "tumor"), (512, 0, 512, "stroma")])
    rules, _, out = _planned(slides, "tiles")
    assert rules == {"manifest", "slides_overview", "tiles"} and "Updated input files" in out and "s1.geojson" in out
    run_snakemake(slides, "--cores", "1", "manifest")
    rules, tiled, _ = _planned(slides, "tiles")
    assert tiled == {"s1"} and "manifest" not in rules
    run_snakemake(slides, "--cores", "1", "tiles")
    # a slide replaced at the same path by an OLDER file (cp -p, rsync -a): mtime alone misses it
    old = (slides / "s0.svs").stat().st_mtime - 3600
    _slide(slides / "s0.svs", size=2048)
    os.utime(slides / "s0.svs", (old, old))
    rules, _, out = _planned(slides, "tiles")
    assert "manifest" in rules and "Params have changed" in out
    run_snakemake(slides, "--cores", "1", "manifest")
    assert _planned(slides, "tiles")[1] == {"s0"}
    run_snakemake(slides, "--cores", "1", "tiles")
    # a tiling setting: every slide's tiles, no manifest re-check for min_tissue ...
    _set_config(slides, **{"tiling.min_tissue": 0.3})
    rules, tiled, _ = _planned(slides, "tiles")
    assert tiled == {"s0", "s1", "s2"} and "manifest" not in rules
    # ... and the manifest first for tile_px (it checks T * base / mag per slide)
    _set_config(slides, **{"tiling.tile_px": 32})
    assert "manifest" in _planned(slides, "tiles")[0]


def test_recovery_after_kill_needs_unlock_as_documented(slides):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(slides), "--cores", "1", "tiles"]
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 120
    while not list((slides / "results" / "logs" / "tile").glob("*.log")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, jobs included, as a lost node would
    proc.wait()
    assert list((slides / ".snakemake" / "locks").iterdir())
    locked = run_snakemake(slides, "--cores", "1", "tiles", "--rerun-incomplete", check=False)
    assert locked.returncode != 0 and "cannot be locked" in locked.stderr
    run_snakemake(slides, "--unlock")
    run_snakemake(slides, "--cores", "1", "tiles", "--rerun-incomplete")
    assert sorted(p.stem for p in (slides / "results" / "tiles").glob("*.parquet")) == ["s0", "s1", "s2"]


def test_no_train_slide_is_named_before_pretraining(slides):
    (slides / "slides.tsv").write_text((slides / "slides.tsv").read_text().replace("\ttrain\n", "\ttest\n"))
    run_snakemake(slides, "--cores", "1", "manifest")
    proc = run_snakemake(slides, "-n", "exp_mad", check=False)
    assert proc.returncode != 0
    assert "no usable train slide (pretraining needs at least one" in proc.stdout + proc.stderr


def test_unknown_timm_arch_stops_the_parse(slides):
    _set_config(slides, **{"model.arch": "vit_smal_patch16_224"})
    start = time.perf_counter()
    proc = run_snakemake(slides, "-n", "tiles", check=False)
    assert proc.returncode != 0 and time.perf_counter() - start < 120
    assert "unknown timm architecture(s): model.arch: 'vit_smal_patch16_224'" in proc.stdout + proc.stderr
    assert not (slides / "results").exists()  # nothing tiled first
