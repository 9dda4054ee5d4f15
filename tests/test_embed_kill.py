"""A kill -9 during `embed`, then the documented `--unlock` and `--rerun-incomplete`: the
part folder of the killed job is redone by itself, never taken for complete (issue 23,
item 7). Real slides, the real workflow; the colour-statistics encoder needs no training."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, run_snakemake
from madflow.synth import write_pyramid

SLIDES = [f"s{n}" for n in range(6)]
PART = "results/color_stats/seed0/embeddings/part0"


def _embedded(workdir):
    """Slide files the killed embed job had finished, wherever it wrote them."""
    return [p for p in (workdir / "results" / "color_stats" / "seed0" / "embeddings").rglob("*.h5")
            if not p.name.startswith(".")]


def test_kill_during_embed_then_rerun_incomplete_redoes_the_part(workdir):
    rng = np.random.default_rng(0)
    rows = ["slide_id\tpath\tsplit"]
    for n, slide in enumerate(SLIDES):
        img = np.kron(rng.integers(40, 230, (256, 256, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
        img[:, 3072:] = 255
        write_pyramid(workdir / f"{slide}.svs", img)  # 4096 px: ~3,000 tissue tiles at 40x
        rows.append(f"{slide}\t{slide}.svs\t{'test' if n % 2 else 'train'}")
    (workdir / "slides.tsv").write_text("\n".join(rows) + "\n")
    config = (workdir / "config.yaml").read_text()
    (workdir / "config.yaml").write_text(config.replace("manifest: demo", "manifest: slides.tsv"))
    run_snakemake(workdir, "--cores", "2", "tiles")
    # reached through the manifest checkpoint, as `evaluate` and `features` reach it
    target = f"results/color_stats/seed0/features/10x/h5_files/{SLIDES[-1]}.h5"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1",
           target]
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    while not _embedded(workdir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, the embed job included
    proc.wait()
    done = _embedded(workdir)
    assert 0 < len(done) < len(SLIDES), f"the kill missed the embed job: {len(done)} slides embedded"
    assert not (workdir / PART).exists()  # the part is only ever in place complete
    run_snakemake(workdir, "--unlock")
    run_snakemake(workdir, "--cores", "1", target, "--rerun-incomplete")
    assert sorted(p.stem for p in (workdir / PART).iterdir() if not p.name.startswith(".")) == SLIDES
    assert (workdir / target).exists()
    trident = workdir / "results/color_stats/seed0/features/trident/10x_64px_0px_overlap"
    assert (trident / "patches" / f"{SLIDES[-1]}_patches.h5").exists()  # TRIDENT's layout beside CLAM's
    assert (trident / "features_madflow_color_stats" / f"{SLIDES[-1]}.h5").exists()
    assert not [p for p in (workdir / PART).parent.iterdir() if p.name.startswith(".")]  # no stray partial
