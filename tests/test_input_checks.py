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
    for n in range(3):  # one slide file per row (the same file twice is an error of its own)
        _slide(tmp_path / f"s{n}.svs", size=2048)
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
            "path": ["s0.svs", "s1.svs", "s2.svs"],
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
    _slide(tmp_path / "t.svs", size=2048)
    mask = np.zeros((129, 128), np.uint8)  # 2048/16 = 128, one row more from rounding up
    mask[:64, :64] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "m.classes.tsv").write_text("value\tname\n1\ttumor\n")
    table = _manifest(tmp_path, {"slide_id": ["a", "b"], "path": ["s.svs", "t.svs"], "labels": ["m.png", ""],
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
    for name in ["good", "g1", "g2", "g3"]:
        _slide(tmp_path / f"{name}.svs")
    (tmp_path / "folder.svs").mkdir()  # a directory where a slide should be
    table = _manifest(
        tmp_path,
        {
            "slide_id": ["good", "my slide", "grp/s1", "../evil", "folder", "missing"],
            "path": ["good.svs", "g1.svs", "g2.svs", "g3.svs", "folder.svs", "gone.svs"],
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
    _slide(tmp_path / "c.svs")
    (tmp_path / "folder.svs").mkdir()
    table = _manifest(tmp_path, {"slide_id": ["a", "b", "c d", "folder"],
                                 "path": ["a.svs", "b.svs", "c.svs", "folder.svs"]})
    checked, rejected = check_manifest(table, MAGS, 64, "skip", 0.5, 0)
    assert sorted(checked["slide_id"]) == ["a", "b"]
    assert sorted(rejected["slide_id"]) == ["c d", "folder"]


# -- splits (item 7) ---------------------------------------------------------------------------
def test_too_few_train_or_test_slides_named_before_any_job(tmp_path):
    _slide(tmp_path / "a.svs")
    _slide(tmp_path / "b.svs")
    all_test = _manifest(tmp_path, {"slide_id": ["a", "b"], "path": ["a.svs", "b.svs"], "split": ["test"] * 2})
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


# -- scanner metadata, overrides, one file twice (issue 23, items 1-4 and 6) ----------------
def _set_mpp_y(path, mpp_y):
    """Rewrite level 0's YResolution of a generic TIFF (OpenSlide's mpp-y comes from it)."""
    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["YResolution"].overwrite((round(1e4 / mpp_y * 1000), 1000))


def test_one_slide_file_under_two_ids_is_an_error_listing_the_rows(tmp_path):
    _slide(tmp_path / "a.svs")
    _slide(tmp_path / "b.svs")
    (tmp_path / "copy.svs").write_bytes((tmp_path / "b.svs").read_bytes())  # an identical copy
    (tmp_path / "sub").mkdir()
    table = _manifest(tmp_path, {"slide_id": ["a1", "a2", "b", "b_copy"],
                                 "path": ["a.svs", "sub/../a.svs", "b.svs", "copy.svs"],
                                 "split": ["train", "test", "train", "test"]})
    msg = _error(table)
    assert "same slide file is listed under several slide ids" in msg
    assert "line 2 (a1, split train), line 3 (a2, split test)" in msg
    assert "line 4 (b, split train), line 5 (b_copy, split test)" in msg and "copy.svs" in msg
    distinct = _manifest(tmp_path, {"slide_id": ["a", "b"], "path": ["a.svs", "b.svs"]}, name="ok.tsv")
    assert len(check_manifest(distinct, MAGS, 64, "error", 0.5, 0)[0]) == 2


def test_non_square_pixels_are_an_error_naming_both_values(tmp_path):
    img = np.full((1024, 1024, 3), 255, np.uint8)
    img[:, :700] = (200, 80, 150)
    write_pyramid(tmp_path / "aniso.tif", img, objective_power=None, mpp=0.25)
    _set_mpp_y(tmp_path / "aniso.tif", 0.30)
    write_pyramid(tmp_path / "square.tif", img, objective_power=None, mpp=0.2527)
    _set_mpp_y(tmp_path / "square.tif", 0.2530)  # within 2%: square up to rounding
    table = _manifest(tmp_path, {"slide_id": ["aniso", "square"], "path": ["aniso.tif", "square.tif"]})
    msg = _line(_error(table), "aniso")
    assert "pixels are not square: openslide.mpp-x 0.25 vs openslide.mpp-y 0.3 um/px" in msg
    assert "fill objective_power or mpp in the slide's manifest row" in msg
    # the user states the pixel size: accepted, recorded as the manifest's
    fixed = _manifest(tmp_path, {"slide_id": ["aniso"], "path": ["aniso.tif"], "mpp": ["0.25"]}, name="fixed.tsv")
    row = check_manifest(fixed, MAGS, 64, "error", 0.3, 0)[0].iloc[0]
    assert (row["base_mag"], row["mag_source"]) == (40.0, "manifest mpp")


def test_objective_power_and_mpp_that_disagree_are_an_error(tmp_path):
    _slide(tmp_path / "ok.svs")
    _slide(tmp_path / "row.svs")
    img = np.full((1024, 1024, 3), 255, np.uint8)
    img[:, :700] = (200, 80, 150)
    write_pyramid(tmp_path / "mislabelled.svs", img, objective_power=40, mpp=0.5)  # a 20x scan, AppMag 40
    rows = {"slide_id": ["ok", "mislabelled", "row"], "path": ["ok.svs", "mislabelled.svs", "row.svs"],
            "objective_power": ["", "", "40"], "mpp": ["", "", "0.5"]}
    msg = _error(_manifest(tmp_path, rows))
    assert "2 of 3" in msg
    assert ("openslide.objective-power 40 and openslide.mpp-x 0.5 um/px (20.0x) disagree by more than 15%"
            in _line(msg, "mislabelled"))
    assert "fill objective_power or mpp in the slide's manifest row" in _line(msg, "mislabelled")
    assert "the manifest row's objective_power 40 and its mpp 0.5 um/px (20.0x) disagree" in _line(msg, "row")
    fixed = _manifest(tmp_path, {"slide_id": ["m"], "path": ["mislabelled.svs"], "objective_power": ["20x"]},
                      name="fixed.tsv")
    row = check_manifest(fixed, [2.5, 10.0], 64, "error", 0.3, 0)[0].iloc[0]
    assert (row["base_mag"], row["mag_source"]) == (20.0, "manifest objective_power")


def test_overrides_that_cannot_be_parsed_are_quoted(tmp_path):
    for n in range(5):
        _slide(tmp_path / f"s{n}.svs")
    rows = {"slide_id": [f"s{n}" for n in range(5)], "path": [f"s{n}.svs" for n in range(5)],
            "objective_power": ["20x", "20X", "twenty", "", ""], "mpp": ["", "", "", "0,25", "0.25um"]}
    msg = _error(_manifest(tmp_path, rows))
    assert "3 of 5" in msg
    assert "objective_power 'twenty' cannot be parsed" in _line(msg, "s2")
    assert "mpp '0,25' cannot be parsed as a pixel size in um/px (use a decimal point, not a comma)" in _line(msg, "s3")
    assert "mpp '0.25um' cannot be parsed" in _line(msg, "s4")
    # 20x and 20X are an objective power of 20: they win over the slide's AppMag 40
    ok = _manifest(tmp_path, {k: v[:2] for k, v in rows.items()}, name="ok.tsv")
    checked = check_manifest(ok, [2.5, 10.0], 64, "error", 0.5, 0)[0]
    assert list(checked["base_mag"]) == [20.0, 20.0]
    assert list(checked["mag_source"]) == ["manifest objective_power"] * 2


@pytest.mark.parametrize("features", [[], [{"type": "Feature", "properties": {"classification": {"name": "tumor"}},
                                             "geometry": {"type": "Point", "coordinates": [10, 10]}}]])
def test_geojson_without_polygons_is_an_error_at_the_manifest(tmp_path, features):
    _slide(tmp_path / "s.svs")
    (tmp_path / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    msg = _error(_manifest(tmp_path, {"slide_id": ["s"], "path": ["s.svs"], "labels": ["s.geojson"]}))
    assert "s.geojson: no polygon annotation (an empty FeatureCollection, or only points or lines" in _line(msg, "s")


def test_spreadsheet_trailing_empty_rows_and_unmatched_class_keys(tmp_path):
    from madflow.manifest import unmatched_class_keys

    _slide(tmp_path / "a.svs")
    _slide(tmp_path / "b.svs")
    _geojson(tmp_path / "a.geojson", [(0, 0, 512, "tumor")])
    table = tmp_path / "slides.csv"  # as Excel saves it: rows of empty cells at the end
    table.write_text("slide_id,path,labels,split\na,a.svs,a.geojson,train\nb,b.svs,,test\n,,,\n,,,\n")
    checked, _ = check_manifest(table, MAGS, 64, "error", 0.3, 0, class_map={"Tumour": "tumor"})
    assert list(checked["slide_id"]) == ["a", "b"]
    assert unmatched_class_keys(checked, {"Tumour": "tumor", "tumor": "tumor"}) == [
        "classes: 'Tumour' matches no class in any label file (classes in the label files: tumor)"
    ]


def test_a_lacking_magnification_is_explained_in_slides_tsv(tmp_path):
    img = np.full((1024, 1024, 3), 255, np.uint8)
    img[:, :700] = (200, 80, 150)
    write_pyramid(tmp_path / "s20.svs", img, objective_power=20, mpp=0.5)
    checked, rejected = check_manifest(_manifest(tmp_path, {"slide_id": ["s20"], "path": ["s20.svs"]}),
                                       MAGS, 64, "error", 0.3, 0)
    grid, *_ = tile_slide(checked.iloc[0].to_dict(), MAGS, 64, 0.5)
    row = slides_overview(checked, rejected, {"s20": grid}, MAGS).iloc[0]
    assert row["tissue_tiles_40x"] == 0
    assert "no 40x: finer than the slide's base magnification 20x (never invented)" in row["notes"]


def test_init_cycle_names_the_experiments():
    config = merged_config({"experiments": {"a": {"init": "b"}, "b": {"init": "a"}}})
    with pytest.raises(ValueError, match=r"experiments 'a' -> 'b' -> 'a': their init settings form a cycle"):
        resolve_train_config(config, {"name": "a", **config["experiments"]["a"]})
    shipped = merged_config({})
    for name, settings in shipped["experiments"].items():
        resolve_train_config(shipped, {"name": name, **settings})  # the shipped chain is fine
