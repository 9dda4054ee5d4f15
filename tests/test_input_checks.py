"""Every bad input named early: label geometry, class names, slide ids, directories, splits,
slides that give no tiles, the config schema, timm names, temp files of killed writes and
metrics on too few slides or tiles. Real slides (tifffile pyramids read by OpenSlide)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from snakemake.utils import validate

from conftest import REPO, merged_config
from madflow import metrics as M
from madflow.io import partial_path, write_atomic
from madflow.manifest import ManifestError, check_manifest, require_split, slides_overview
from madflow.sample_size import flag_small_samples
from madflow.synth import write_pyramid
from madflow.tiling import tile_slide
from madflow.timm_names import is_timm_model, unknown_archs
from madflow.config import TRAIN_DEFAULTS, resolve_train_config
from madflow.modes import MODES
from test_metrics import make_tiles

MAGS = [2.5, 10.0, 40.0]
SCHEMA = str(REPO / "schemas" / "config.schema.yaml")


def _slide(path, size=1024, tissue=True):
    """A 40x Aperio-style slide: a saturated 'tissue' block on the left, glass elsewhere."""
    img = np.full((size, size, 3), 255, np.uint8)
    if tissue:
        img[:, : size * 3 // 4] = (200, 80, 150)
    write_pyramid(path, img, objective_power=40, mpp=0.25)
    return path


def _geojson(path, squares):
    """squares: [(x, y, side, class name)] in level-0 px."""
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]},
            "properties": {"classification": {"name": name}},
        }
        for x, y, s, name in squares
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _manifest(tmp_path, rows, name="manifest.tsv"):
    table = tmp_path / name
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    return table


def _error(table, **kw):
    with pytest.raises(ManifestError) as err:
        check_manifest(table, MAGS, 64, "error", 0.3, 0, **kw)
    return str(err.value)


def _line(msg, slide_id):
    return next(ln for ln in msg.splitlines() if ln.strip().startswith(f"- {slide_id}:"))


# -- label geometry (item 3) ---------------------------------------------------------------
def test_label_geometry_errors_name_slide_and_file(tmp_path):
    _slide(tmp_path / "s.svs", size=2048)
    squeezed = tmp_path / "squeezed.png"  # 100 x 37 on a 2048 x 2048 slide: stretched before
    Image.fromarray(np.ones((37, 100), np.uint8)).save(squeezed)
    (tmp_path / "squeezed.classes.tsv").write_text("value\tname\n1\ttumor\n")
    unknown = tmp_path / "unknown.png"  # value 7 is not in the class table: dropped before
    mask = np.ones((512, 512), np.uint8)
    mask[:10, :10] = 7
    Image.fromarray(mask).save(unknown)
    (tmp_path / "unknown.classes.tsv").write_text("value\tname\n1\ttumor\n")
    outside = _geojson(tmp_path / "outside.geojson", [(5000, 5000, 1000, "tumor")])  # 0 labelled tiles before
    table = _manifest(
        tmp_path,
        {
            "slide_id": ["squeezed", "unknown", "outside"],
            "path": ["s.svs"] * 3,
            "labels": [squeezed.name, unknown.name, outside.name],
        },
    )
    msg = _error(table)
    assert "3 of 3" in msg
    assert "squeezed.png: label mask is 100 x 37 px but the slide is 2048 x 2048" in _line(msg, "squeezed")
    assert "unknown.png: mask value(s) [7] are not in unknown.classes.tsv" in _line(msg, "unknown")
    assert "outside.geojson: 1 of 1 annotation(s) lie outside the slide" in _line(msg, "outside")


def test_mask_scaled_with_rounding_is_accepted(tmp_path):
    _slide(tmp_path / "s.svs", size=2048)
    mask = np.zeros((129, 128), np.uint8)  # 2048/16 = 128, one row more from rounding up
    mask[:64, :64] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "m.classes.tsv").write_text("value\tname\n1\ttumor\n")
    table = _manifest(tmp_path, {"slide_id": ["a", "b"], "path": ["s.svs"] * 2, "labels": ["m.png", ""],
                                 "split": ["train", "test"]})
    checked, _ = check_manifest(table, MAGS, 64, "error", 0.3, 0)
    assert checked.set_index("slide_id").loc["a", "classes"] == "tumor"


# -- class names (item 2) -------------------------------------------------------------------
def _class_set(tmp_path, test_name):
    rows = {"slide_id": [], "path": [], "labels": [], "split": []}
    for n, (split, tumour) in enumerate([("train", "tumor"), ("train", "tumor"), ("test", test_name)]):
        _slide(tmp_path / f"s{n}.svs")
        _geojson(tmp_path / f"s{n}.geojson", [(0, 0, 512, tumour), (512, 0, 512, "stroma")])
        for key, value in zip(rows, [f"s{n}", f"s{n}.svs", f"s{n}.geojson", split]):
            rows[key].append(value)
    return _manifest(tmp_path, rows)


def test_class_seen_only_in_test_or_train_is_an_error(tmp_path):
    msg = _error(_class_set(tmp_path, "Tumour"))
    assert "class 'Tumour' only in test slides (s2)" in msg
    assert "class 'tumor' only in train slides (s0, s1)" in msg
    assert "classes: {Tumour: tumor}" in msg


def test_class_mapping_renames_in_manifest_and_tiles(tmp_path):
    table = _class_set(tmp_path, "Tumour")
    checked, _ = check_manifest(table, MAGS, 64, "error", 0.3, 0, class_map={"Tumour": "tumor"})
    row = checked.set_index("slide_id").loc["s2"]
    assert (row["classes_in_file"], row["classes"]) == ("Tumour,stroma", "stroma,tumor")
    grid, *_ = tile_slide(row.to_dict() | {"slide_id": "s2"}, MAGS, 64, 0.0, {"Tumour": "tumor"})
    assert set(grid["label"].dropna()) == {"tumor", "stroma"}


# -- slide ids, directories, any failure (items 5, 6) ---------------------------------------
def test_every_bad_slide_listed_at_once_with_any_cause(tmp_path):
    _slide(tmp_path / "good.svs")
    (tmp_path / "folder.svs").mkdir()  # a directory where a slide should be
    table = _manifest(
        tmp_path,
        {
            "slide_id": ["good", "my slide", "grp/s1", "../evil", "folder", "missing"],
            "path": ["good.svs", "good.svs", "good.svs", "good.svs", "folder.svs", "gone.svs"],
        },
    )
    msg = _error(table)
    assert "5 of 6" in msg
    for bad in ["my slide", "grp/s1", "../evil"]:
        assert "is not allowed" in _line(msg, bad)
    assert "folder.svs: is a directory" in _line(msg, "folder")
    assert "file not found" in _line(msg, "missing")


def test_bad_slides_skip_lists_directories_and_ids(tmp_path):
    _slide(tmp_path / "a.svs")
    _slide(tmp_path / "b.svs")
    (tmp_path / "folder.svs").mkdir()
    table = _manifest(tmp_path, {"slide_id": ["a", "b", "c d", "folder"],
                                 "path": ["a.svs", "b.svs", "a.svs", "folder.svs"]})
    checked, rejected = check_manifest(table, MAGS, 64, "skip", 0.5, 0)
    assert sorted(checked["slide_id"]) == ["a", "b"]
    assert sorted(rejected["slide_id"]) == ["c d", "folder"]


# -- splits (item 7) ---------------------------------------------------------------------------
def test_too_few_train_or_test_slides_named_before_any_job(tmp_path):
    _slide(tmp_path / "a.svs")
    all_test = _manifest(tmp_path, {"slide_id": ["a", "b"], "path": ["a.svs"] * 2, "split": ["test"] * 2})
    checked = check_manifest(all_test, MAGS, 64, "error", 0.3, 0)[0]
    with pytest.raises(ManifestError, match=r"no usable train slide \(pretraining needs at least one"):
        require_split(checked, "train", "pretraining", all_test)
    assert require_split(checked, "test", "evaluation", all_test) == ["a", "b"]


# -- slides that give no tiles (item 9) -----------------------------------------------------
def test_blank_and_tiny_slides_are_named(tmp_path):
    _slide(tmp_path / "ok.svs")
    _slide(tmp_path / "white.svs", tissue=False)
    _slide(tmp_path / "tiny.svs", size=512)  # a 2.5x tile covers 1024 px at 40x
    table = _manifest(tmp_path, {"slide_id": ["ok", "white", "tiny"], "path": ["ok.svs", "white.svs", "tiny.svs"],
                                 "split": ["train", "test", "test"]})
    checked, rejected = check_manifest(table, MAGS, 64, "error", 0.3, 0)
    notes = checked.set_index("slide_id")["notes"]
    assert notes["ok"] == ""
    assert "no tissue detected" in notes["white"]
    assert "smaller than one 2.5x tile (512 x 512 px, a tile covers 1024 px)" in notes["tiny"]
    tables = {}
    for row in checked.to_dict("records"):
        tables[row["slide_id"]], *_ = tile_slide(row, MAGS, 64, 0.5)
    overview = slides_overview(checked, rejected, tables, MAGS).set_index("slide_id")
    assert overview.loc["ok", "tissue_tiles_2.5x"] > 0 and "0 tissue" not in overview.loc["ok", "notes"]
    assert overview.loc["white", "tissue_tiles_40x"] == 0
    assert "0 tissue tiles at 2.5x" in overview.loc["white", "notes"]
    assert "0 tissue tiles at 2.5x" in overview.loc["tiny", "notes"]


# -- config schema and timm names (item 4) ------------------------------------------------
@pytest.mark.parametrize(
    "override, unexpected",
    [
        ({"tilling": {"tile_px": 64}}, "'tilling' was unexpected"),
        ({"tiling": {"tile_size": 64}}, "'tile_size' was unexpected"),
        ({"model": {"kwarg": {}}}, "'kwarg' was unexpected"),
        ({"evaluate": {"n_bootstraps": 10}}, "'n_bootstraps' was unexpected"),
        ({"experiments": {"mad": {"steps": -5}}}, "-5 is less than the minimum of 1"),
        ({"experiments": {"mad": {"stepz": 5}}}, "'stepz' was unexpected"),
        ({"experiments": {"x": {"model": {"head": {"n_protos": 3}}}}}, "'n_protos' was unexpected"),
        ({"experiments": {"x": {"lr": "fast"}}}, "'fast' is not of type 'number'"),
        ({"experiments": {"x": {"mode": "external"}}}, "'arch' is a required property"),
        ({"classes": {"Tumour": 3}}, "3 is not of type 'string'"),
    ],
)
def test_schema_rejects_misspelt_and_mistyped_keys(override, unexpected):
    with pytest.raises(Exception, match="Error validating config file") as err:
        validate(merged_config(override), SCHEMA)
    assert unexpected in str(err.value)


def test_schema_accepts_shipped_configs_and_covers_every_train_setting():
    for overrides in ({}, yaml.safe_load((REPO / "config_paper.yaml").read_text()),
                      yaml.safe_load((REPO / "tests" / "config_small.yaml").read_text())):
        validate(merged_config(overrides), SCHEMA)
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    assert set(schema["$defs"]["train_settings"]["properties"]) == set(TRAIN_DEFAULTS)
    # modes are checked against the registry itself when the workflow is parsed
    with pytest.raises(ValueError, match="unknown experiment mode 'made'.*mad"):
        resolve_train_config(merged_config({}), {"name": "x", "mode": "made"})
    assert set(MODES) >= {"mad", "dino", "same_mag", "shuffled", "interp", "tri", "supervised"}


def test_timm_names_known_without_import():
    assert is_timm_model("vit_small_patch16_224") and is_timm_model("vit_giant_patch14_reg4_dinov2")
    assert is_timm_model("vit_base_patch16_224.augreg_in21k")
    assert not is_timm_model("vit_smal_patch16_224")
    config = merged_config({"experiments": {"ext": {"mode": "external", "arch": "resnet5O"}}})
    assert unknown_archs(config) == ["experiments.ext.arch: 'resnet5O'"]
    # the fast path must not import timm (and torch with it)
    code = "import sys; from madflow.timm_names import is_timm_model as f; f('vit_small_patch16_224'); print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- temp files of killed writes (item 8) -------------------------------------------------
def test_killed_write_leaves_no_stray_after_rerun(tmp_path):
    target = tmp_path / "huge.png"
    code = (
        "import sys, time; from pathlib import Path; from madflow.io import write_atomic\n"
        "def slow(tmp):\n    Path(tmp).write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n"
        f"write_atomic({str(target)!r}, slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in tmp_path.iterdir()] == [partial_path(target).name]  # what a kill leaves
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(b"png"))  # the rerun
    assert [p.name for p in tmp_path.iterdir()] == ["huge.png"] and target.read_bytes() == b"png"


# -- metrics on too few slides or tiles (item 7) -------------------------------------------
def test_one_labelled_test_slide_gives_no_ci_and_few_tiles_a_note():
    tiles, X = make_tiles(n_slides=4, n_test=1, parents_per_slide=4, children=4, n_classes=4)
    raw, artifacts = M.evaluate(tiles, X, magnifications=MAGS, n_bootstrap=50)
    ba = raw[(raw["metric"] == "probe_ba") & (raw["scope"] == "10->40")].iloc[0]
    assert ba["ci_low"] == ba["ci_high"]  # what the bootstrap over one slide gives: zero width
    flagged = flag_small_samples(raw, artifacts).set_index(["metric", "scope"])
    row = flagged.loc[("probe_ba", "10->40")]
    assert np.isnan(row["ci_low"]) and np.isnan(row["ci_high"]) and row["value"] == ba["value"]
    assert row["note"].startswith("no CI: 1 labelled test slide(s) with tiles at 40x")
    assert "k-means of 4 tiles into 4 clusters" in flagged.loc[("ami", "2.5"), "note"]
    assert flagged.loc[("ami", "40"), "note"] == ""  # 64 tiles: enough


def test_no_labelled_test_slide_says_why():
    tiles, X = make_tiles(n_slides=6, n_test=2)
    tiles.loc[tiles["split"] == "test", ["label", "label_purity"]] = [None, np.nan]
    metrics, artifacts = M.evaluate(tiles, X, magnifications=MAGS, n_bootstrap=20)
    ba = flag_small_samples(metrics, artifacts).set_index(["metric", "scope"]).loc[("probe_ba", "10->40")]
    assert np.isnan(ba["value"]) and ba["note"] == "not applicable: no labelled test tiles"


def test_missing_embedding_file_names_the_slide(tmp_path):
    from madflow.features import find_embedding_files

    job = tmp_path / "embeddings" / "part0"
    job.mkdir(parents=True)
    (job / "slide_a.h5").touch()
    tables = [str(tmp_path / "tiles" / f"{s}.parquet") for s in ("slide_a", "slide_b")]
    with pytest.raises(FileNotFoundError, match="slide_b"):
        find_embedding_files([tmp_path / "embeddings"], tables)
    assert find_embedding_files([tmp_path / "embeddings"], tables[:1]) == [job / "slide_a.h5"]
