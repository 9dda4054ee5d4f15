"""Foundation: magnification resolution, level choice, exact hierarchy, reader pixels,
labels, the manifest stage's bad-slide handling, and the real TCGA slide."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from madflow.manifest import ManifestError, check_manifest
from madflow.slides import SlideError, SlideReader, choose_levels, resolve_base_mag
from madflow.synth import make_slide, write_pyramid
from madflow.tiling import build_grid, tile_slide

TCGA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga-cr-7395-01a-01-ts1.svs"
MAGS = [2.5, 10.0, 40.0]


def _image(size, seed=0):
    """Smooth random RGB content (JPEG-friendly) with a white margin on the right."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 230, (size // 64 + 1, size // 64 + 1, 3), dtype=np.uint8)
    img = np.kron(coarse, np.ones((64, 64, 1), np.uint8))[:size, :size]
    img[:, size * 3 // 4 :] = 255
    return img


# -- magnification resolution ---------------------------------------------------------
def test_resolve_base_mag_cases():
    assert resolve_base_mag({"openslide.objective-power": "40", "openslide.mpp-x": "0.25"}) == (
        40.0,
        0.25,
        "objective-power",
    )
    assert resolve_base_mag({"openslide.mpp-x": "0.5"})[:2] == (20.0, 0.5)
    assert resolve_base_mag({}, objective_power="20")[0] == 20.0
    assert resolve_base_mag({}, mpp="0.25")[0] == 40.0
    with pytest.raises(SlideError, match="no magnification information"):
        resolve_base_mag({}, objective_power="", mpp="")


def test_magnification_from_real_files(tmp_path):
    img = _image(1024)
    aperio, mpp_only, bare, bare2 = tmp_path / "a.svs", tmp_path / "m.tif", tmp_path / "n.tif", tmp_path / "n2.tif"
    write_pyramid(aperio, img, objective_power=40, mpp=0.25)
    write_pyramid(mpp_only, img, objective_power=None, mpp=0.5)
    write_pyramid(bare, img, objective_power=None, mpp=None)
    write_pyramid(bare2, _image(1024, 1), objective_power=None, mpp=None)  # one file per row
    table = tmp_path / "manifest.tsv"
    pd.DataFrame(
        {
            "slide_id": ["a", "m", "n", "n_override"],
            "path": [aperio.name, mpp_only.name, bare.name, bare2.name],
            "objective_power": ["", "", "", "20"],
        }
    ).to_csv(table, sep="\t", index=False)
    checked, rejected = check_manifest(table, MAGS, 64, "skip", 0.3, 0)
    got = checked.set_index("slide_id")
    assert got.loc["a", "base_mag"] == 40 and got.loc["a", "vendor"] == "aperio"
    assert got.loc["m", "base_mag"] == 20 and got.loc["m", "mag_source"] == "mpp"
    assert got.loc["n_override", "base_mag"] == 20
    # a 20x slide lacks 40x: recorded, not invented
    assert got.loc["m", "lacking"] == "40x" and got.loc["m", "level_40"] == ""
    assert list(rejected["slide_id"]) == ["n"]
    assert "no magnification information" in rejected["cause"].iloc[0]


def test_level_choice_with_rounded_level_sizes():
    # 16383 -> 4095 -> 1023: downsamples slightly above 4 and 16
    ds = (1.0, 16383 / 4095, 16383 / 1023)
    plan = choose_levels(ds, 40.0, MAGS)
    assert (plan[40.0].level, plan[10.0].level, plan[2.5].level) == (0, 1, 2)
    assert all(p.native for p in plan.values())
    # a 20x slide with levels 1/4/16: 40x absent, 10x and 2.5x resized from finer levels
    plan = choose_levels((1.0, 4.0, 16.0), 20.0, MAGS)
    assert plan[40.0] is None
    assert (plan[10.0].level, plan[10.0].native) == (0, False)
    assert (plan[2.5].level, plan[2.5].native) == (1, False)


# -- exact hierarchy --------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(200, 9000),
    height=st.integers(200, 9000),
    tile_px=st.sampled_from([16, 32, 64, 224]),
    base=st.sampled_from([20.0, 40.0]),
)
def test_children_partition_parent_exactly(width, height, tile_px, base):
    mags = [2.5, 10.0] if base == 20.0 else MAGS
    grid = build_grid(width, height, base, mags, tile_px)
    coarse = grid[grid["mag"] == mags[0]]
    assert coarse["x0"].max() < width and coarse["y0"].max() < height
    assert (coarse["x0"] + coarse["size0"]).max() >= width
    for depth, (lo, hi) in enumerate(zip(mags[:-1], mags[1:])):
        key = ["i", "j", "k"][: depth + 2]
        parents = grid[grid["mag"] == lo].set_index(key)
        kids = grid[grid["mag"] == hi]
        assert len(kids) == 16 * len(parents)
        child_key = ["k", "m"][depth]
        par = parents.loc[pd.MultiIndex.from_frame(kids[key].astype("int64"))]
        dy, dx = np.divmod(kids[child_key].to_numpy(int), 4)
        # child footprint = parent offset + (dx, dy) * S/4, size S/4: 1/16 of the area
        assert (kids["size0"].to_numpy() * 4 == par["size0"].to_numpy()).all()
        assert (kids["x0"].to_numpy() == par["x0"].to_numpy() + dx * kids["size0"].to_numpy()).all()
        assert (kids["y0"].to_numpy() == par["y0"].to_numpy() + dy * kids["size0"].to_numpy()).all()
        assert sorted(set(kids[child_key])) == list(range(16))


def test_index_numbering_matches_spec():
    grid = build_grid(2048, 2048, 40.0, MAGS, 64)
    row = grid[(grid["mag"] == 40) & (grid["i"] == 1) & (grid["j"] == 0) & (grid["k"] == 6) & (grid["m"] == 9)]
    # parent (1, 0) at 1024 px; k=6 -> dy=1, dx=2 (256 px); m=9 -> dy=2, dx=1 (64 px)
    assert (row["x0"].item(), row["y0"].item()) == (0 + 2 * 256 + 1 * 64, 1024 + 1 * 256 + 2 * 64)
    assert grid[grid["mag"] == 2.5][["k", "m"]].isna().all().all()
    assert grid[grid["mag"] == 10][["m"]].isna().all().all()


def _checked(tmp_path, paths, labels=None, **cols):
    table = tmp_path / "manifest.tsv"
    df = pd.DataFrame({"slide_id": [Path(p).stem for p in paths], "path": [str(p) for p in paths]})
    if labels:
        df["labels"] = [str(x) for x in labels]
    for k, v in cols.items():
        df[k] = v
    df.to_csv(table, sep="\t", index=False)
    return check_manifest(table, MAGS, 64, "error", 0.3, 0)[0]


def test_parent_pixels_are_box_downsample_of_children(tmp_path):
    path = tmp_path / "s.svs"
    make_slide(path, seed=3, size=2048)
    slide = _checked(tmp_path, [path]).iloc[0].to_dict()
    grid, *_ = tile_slide(slide, MAGS, 64, 0.5)
    reader = SlideReader(path)
    parents = grid[(grid["mag"] == 10) & grid["tissue"]].head(4)
    assert len(parents)
    for p in parents.itertuples():
        kids = grid[(grid["mag"] == 40) & (grid["i"] == p.i) & (grid["j"] == p.j) & (grid["k"] == p.k)]
        kids = kids.sort_values("m")
        mosaic = np.zeros((256, 256, 3), np.float32)
        for kid, img in zip(kids.itertuples(), reader.read_tiles(kids)):
            dy, dx = divmod(kid.m, 4)
            mosaic[dy * 64 : dy * 64 + 64, dx * 64 : dx * 64 + 64] = img
        expected = mosaic.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        parent = reader.read_tile(p._asdict()).astype(np.float32)
        # JPEG at both levels: small mean error, no misalignment (a 1-px shift costs far more)
        assert np.abs(parent - expected).mean() < 6, np.abs(parent - expected).mean()


def test_reader_nonnative_resize_matches_native(tmp_path):
    path = tmp_path / "s.svs"
    make_slide(path, seed=4, size=2048)
    slide = _checked(tmp_path, [path]).iloc[0].to_dict()
    grid, *_ = tile_slide(slide, MAGS, 64, 0.5)
    row = grid[(grid["mag"] == 10) & grid["tissue"]].iloc[0].to_dict()
    reader = SlideReader(path)
    native = reader.read_tile(row).astype(np.float32)
    resized = reader.read_tile({**row, "level": 0, "downsample": 1.0}).astype(np.float32)
    assert np.abs(native - resized).mean() < 6


def test_reader_decodes_into_recycled_buffers_exactly(tmp_path):
    """A 2-tile cache decodes into evicted tiles' buffers, a second reader into the first's
    spare ones: the pixels are still exactly the stored tiles' (tifffile's own decode)."""
    import tifffile

    from madflow import slides

    path = tmp_path / "s.svs"
    make_slide(path, seed=5, size=1024)
    with tifffile.TiffFile(path) as tif:
        level0 = tif.pages[0].asarray()
    regions = [(30, 40, 700, 600), (0, 0, 1024, 1024), (300, 260, 64, 64)]  # x, y, w, h
    for _ in range(2):
        with SlideReader(path, cache_tiles=2) as reader:
            for x, y, w, h in regions:
                assert np.array_equal(reader.read_level_region(0, x, y, w, h), level0[y : y + h, x : x + w])
        assert slides._SPARE_BUFFERS[(256, 256, 3)]  # the closed reader left its buffers


def test_read_tiles_batch_matches_stored_pixels_and_edges(tmp_path):
    """A batch read (each stored tile decoded once, copied into every tile that touches it,
    into a caller's buffer) gives the stored pixels exactly, white past the level's edge,
    native and resized rows mixed, with a cache too small to hold the batch."""
    import tifffile

    from madflow import slides

    path = tmp_path / "s.svs"
    make_slide(path, seed=6, size=1024)
    with tifffile.TiffFile(path) as tif:
        level0 = tif.pages[0].asarray()
    T = 224
    padded = np.full((1024 + 2 * T, 1024 + 2 * T, 3), 255, np.uint8)
    padded[T:-T, T:-T] = level0
    xy = [(0, 0), (224, 0), (30, 500), (900, 900), (-100, 40), (1000, -50), (256, 256), (30, 500)]
    df = pd.DataFrame({"x0": [x for x, _ in xy], "y0": [y for _, y in xy], "size0": T, "tile_px": T,
                       "level": 0, "downsample": 1.0})
    resized = {"x0": 448, "y0": 448, "size0": 2 * T, "tile_px": T, "level": 0, "downsample": 1.0}
    df = pd.concat([df, pd.DataFrame([resized])], ignore_index=True)
    out = np.zeros((len(df), T, T, 3), np.uint8)
    with SlideReader(path, cache_tiles=2) as reader:
        assert reader.read_tiles(df, out=out) is out
        for n, (x, y) in enumerate(xy):
            assert np.array_equal(out[n], padded[y + T : y + 2 * T, x + T : x + 2 * T]), (x, y)
        assert np.array_equal(out[-1], reader.read_tile(resized))
        with pytest.raises(ValueError, match="s.svs.*uint8 buffer of shape"):
            reader.read_tiles(df, out=out[:2])
    assert slides.decode_buffer((256, 256, 3)).ctypes.data % 64 == 16


# -- labels -------------------------------------------------------------------------------
def test_geojson_labels_known_regions(tmp_path):
    path = tmp_path / "s.svs"
    write_pyramid(path, np.full((2048, 2048, 3), 180, np.uint8), objective_power=40, mpp=0.25)

    def square(x, y, s, name):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"classification": {"name": name}},
        }

    # tumor fills parent (0,0) exactly; stroma covers the top-left 768 x 768 of parent (0,1)
    geo = {"type": "FeatureCollection", "features": [square(0, 0, 1024, "tumor"), square(1024, 0, 768, "stroma")]}
    gpath = tmp_path / "s.geojson"
    gpath.write_text(json.dumps(geo))
    slide = _checked(tmp_path, [path], labels=[gpath]).iloc[0].to_dict()
    grid, *_ = tile_slide(slide, MAGS, 64, 0.0)
    top = grid[grid["mag"] == 2.5].set_index(["i", "j"])
    assert top.loc[(0, 0), "label"] == "tumor" and top.loc[(0, 0), "label_purity"] == pytest.approx(1)
    assert top.loc[(0, 1), "label"] == "stroma"
    assert top.loc[(0, 1), "label_purity"] == pytest.approx(0.75**2, abs=1e-6)
    assert pd.isna(top.loc[(1, 1), "label"])
    kids = grid[(grid["mag"] == 10) & (grid["i"] == 0) & (grid["j"] == 1)]
    outside = (kids["k"] % 4 == 3) | (kids["k"] // 4 == 3)
    assert (kids["label"].isna() == outside).all()
    assert (kids.loc[~outside, "label_purity"] == 1).all()


# -- bad slides -----------------------------------------------------------------------------
def _bad_set(tmp_path):
    good = tmp_path / "good.svs"
    make_slide(good, seed=1, size=1024)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    nomag = tmp_path / "nomag.tif"
    write_pyramid(nomag, _image(1024), objective_power=None, mpp=None)
    notslide = tmp_path / "notes.svs"
    notslide.write_text("not a slide")
    table = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "slide_id": ["good", "truncated", "nomag", "notes", "missing"],
            "path": [good.name, truncated.name, nomag.name, notslide.name, "gone.svs"],
        }
    ).to_csv(table, index=False)
    return table


def test_bad_slides_error_lists_every_bad_slide(tmp_path):
    table = _bad_set(tmp_path)
    with pytest.raises(ManifestError) as err:
        check_manifest(table, MAGS, 64, "error", 0.3, 0)
    msg = str(err.value)
    assert "4 of 5" in msg
    for slide_id, cause in [
        ("truncated", "truncated"),
        ("nomag", "no magnification information"),
        ("notes", "not a slide format"),
        ("missing", "file not found"),
    ]:
        line = next(ln for ln in msg.splitlines() if ln.strip().startswith(f"- {slide_id}:"))
        assert cause in line, line


def test_bad_slides_skip_keeps_good_and_lists_rejected(tmp_path):
    table = _bad_set(tmp_path)
    checked, rejected = check_manifest(table, MAGS, 64, "skip", 0.3, 0)
    assert list(checked["slide_id"]) == ["good"]
    assert sorted(rejected["slide_id"]) == ["missing", "nomag", "notes", "truncated"]
    assert rejected["cause"].str.len().min() > 10


def test_manifest_level_errors(tmp_path):
    good = tmp_path / "good.svs"
    make_slide(good, seed=1, size=1024)
    dup = tmp_path / "dup.tsv"
    pd.DataFrame({"slide_id": ["a", "a"], "path": [good.name] * 2}).to_csv(dup, sep="\t", index=False)
    with pytest.raises(ManifestError, match="duplicate slide_id.*a"):
        check_manifest(dup, MAGS, 64, "skip", 0.3, 0)
    nocol = tmp_path / "nocol.tsv"
    pd.DataFrame({"slide": ["a"], "file": [good.name]}).to_csv(nocol, sep="\t", index=False)
    with pytest.raises(ManifestError, match="missing column.*slide_id, path"):
        check_manifest(nocol, MAGS, 64, "skip", 0.3, 0)
    badlab = tmp_path / "badlab.tsv"
    (tmp_path / "broken.geojson").write_text("{not json")
    pd.DataFrame({"slide_id": ["a"], "path": [good.name], "labels": ["broken.geojson"]}).to_csv(
        badlab, sep="\t", index=False
    )
    with pytest.raises(ManifestError, match="broken.geojson: not valid GeoJSON"):
        check_manifest(badlab, MAGS, 64, "error", 0.3, 0)


# -- the real TCGA slide ----------------------------------------------------------------
@pytest.mark.skipif(not TCGA.exists(), reason=f"real slide fixture {TCGA} not present")
def test_real_tcga_slide_with_override(tmp_path):
    table = tmp_path / "m.tsv"
    pd.DataFrame({"slide_id": ["tcga"], "path": [str(TCGA)]}).to_csv(table, sep="\t", index=False)
    with pytest.raises(ManifestError, match="tcga: no magnification information"):
        check_manifest(table, [5.0, 20.0], 64, "skip", 0.3, 0)
    # JPEG 2000, levels 1 and ~2: with a 20x override, 20x is native (level 0), 5x resized
    pd.DataFrame({"slide_id": ["tcga"], "path": [str(TCGA)], "objective_power": ["20"]}).to_csv(
        table, sep="\t", index=False
    )
    checked, rejected = check_manifest(table, [5.0, 20.0], 64, "error", 0.3, 0)
    slide = checked.iloc[0].to_dict()
    assert slide["native_20"] and not slide["native_5"] and slide["level_5"] == 1
    grid, *_ = tile_slide(slide, [5.0, 20.0], 64, 0.5)
    assert 0 < grid["tissue"].mean() < 1
    reader = SlideReader(TCGA)
    assert reader.backend == "tifffile"
    row = grid[(grid["mag"] == 20) & grid["tissue"]].iloc[0]
    tile = reader.read_tile(row.to_dict())
    ref = np.asarray(reader.slide.read_region((int(row.x0), int(row.y0)), 0, (64, 64)))[..., :3]
    assert np.array_equal(tile, ref)  # level 0: identical to OpenSlide
    assert tile.std() > 5  # tissue, not blank
