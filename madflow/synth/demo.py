"""The embedded demo: synthetic slides with GeoJSON ground truth and their manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from madflow.io import write_atomic
from madflow.synth.pyramid import TILE, write_streamed_svs
from madflow.synth.render import CLASS_COLORS, CLASSES, SlideModel, calibrate, label_polygons, render_rgb, tile_bands


def _write_geojson(P: SlideModel, path: Path):
    import shapely

    feats = []
    for name, geom in label_polygons(P).items():
        gj = json.loads(shapely.to_geojson(geom))
        feats.append({"type": "Feature", "id": f"{path.stem}-{name}",
                      "geometry": gj,
                      "properties": {"objectType": "annotation",
                                     "classification": {"name": name,
                                                        "color": CLASS_COLORS[name]}}})
    text = json.dumps({"type": "FeatureCollection", "features": feats})
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


# --------------------------------------------------------------------------- public API
def make_slide(path, seed: int, size: int = 4096, *, labels_path=None, variant: str = "shared") -> dict:
    """Write one synthetic Aperio slide at `path` (and its GeoJSON at `labels_path`).

    Returns a small summary: seed, size, stain parameters, tissue fraction and per-class
    area fractions (of the whole slide) from the label grid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    P = SlideModel(seed, size, variant)
    lut, cache = calibrate(P, keep=size <= 4096)
    bands = dict(tile_bands(size))

    def render_band(y0: int) -> np.ndarray:
        band = np.empty((TILE, size, 3), np.uint8)
        for x0, w in bands[y0]:
            cached = cache.pop((x0, y0), None) if cache else None
            band[:, x0:x0 + w] = render_rgb(P, lut, x0, y0, w, TILE, cached)
        return band

    write_streamed_svs(path, size, render_band)
    if labels_path is not None:
        labels_path = Path(labels_path)
        labels_path.parent.mkdir(parents=True, exist_ok=True)
        _write_geojson(P, labels_path)
    n = P.cls_grid.size
    areas = {name: float(np.sum(P.tis_grid & (P.cls_grid == c)) / n)
             for c, name in enumerate(CLASSES)}
    return {
        "path": str(path), "labels": str(labels_path) if labels_path else None,
        "seed": int(seed), "size": int(size), "variant": variant,
        "stain": {"h_vector": [round(float(v), 4) for v in P.vh],
                  "e_vector": [round(float(v), 4) for v in P.ve],
                  "h_scale": round(P.sh, 4), "e_scale": round(P.se, 4),
                  "background_od": [round(float(v), 4) for v in P.bg_od]},
        "tissue_frac": float(P.tis_grid.mean()),
        "class_area_frac": areas,
    }


def slide_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(k), 0xD3A0]).generate_state(1)[0])


def _make_one(args):
    path, seed, size, labels, variant = args
    return make_slide(path, seed, size, labels_path=labels, variant=variant)


def make_demo(outdir, n_slides: int, size: int, seed: int, n_test: int, *,
              workers: int | None = None, variant: str = "shared") -> Path:
    """Write `n_slides` slides + GeoJSON and `manifest.tsv` (slide_id, path, labels, split).

    Slide k uses seed `slide_seed(seed, k)`; the test slides are a seeded draw of `n_test`
    slides. `workers` processes (default: up to the usable CPUs) generate slides in
    parallel; the output does not depend on it."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if not 0 <= n_test <= n_slides:
        raise ValueError(f"n_test must be in [0, n_slides], got {n_test} of {n_slides}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B17]))
    test = set(rng.choice(n_slides, n_test, replace=False).tolist()) if n_test else set()
    jobs = [(outdir / f"slide_{k:02d}.svs", slide_seed(seed, k), size,
             outdir / f"slide_{k:02d}.geojson", variant) for k in range(n_slides)]
    if workers is None:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:
            workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), n_slides))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_make_one, jobs))
    else:
        for job in jobs:
            _make_one(job)
    rows = ["slide_id\tpath\tlabels\tsplit"]
    for k in range(n_slides):
        sid = f"slide_{k:02d}"
        rows.append(f"{sid}\t{sid}.svs\t{sid}.geojson\t{'test' if k in test else 'train'}")
    man = outdir / "manifest.tsv"
    write_atomic(man, lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
    return man


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="Write synthetic Aperio demo slides.")
    ap.add_argument("outdir")
    ap.add_argument("--n-slides", type=int, default=12)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--variant", default="shared", help="shared | confusers")
    a = ap.parse_args(argv)
    print(make_demo(a.outdir, a.n_slides, a.size, a.seed, a.n_test, workers=a.workers, variant=a.variant))


if __name__ == "__main__":
    main()
