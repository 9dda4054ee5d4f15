"""Day one with real slides: magnification from the MPP values scanners really write, manifest
corrections that win over metadata, sparse TIFF tiles, and coords/feature files that CLAM's
and TRIDENT's readers load unchanged (their access patterns are written out below)."""

from pathlib import Path

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import yaml
from PIL import Image

from conftest import REPO, merged_config, run_snakemake
from madflow.manifest import ManifestError, check_manifest
from madflow.slides import BACKGROUND, SlideError, SlideReader, resolve_base_mag, snap_magnification
from madflow.synth import write_pyramid
from madflow.tiling import tile_slide, write_coords_h5

TCGA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga-cr-7395-01a-01-ts1.svs"
MAGS = [2.5, 10.0, 40.0]
# what scanners write (no objective power in the file): 40x and 20x, never 0.25 / 0.5
MPP_40X = [0.2527, 0.2630, 0.2428]
MPP_20X = [0.4990, 0.5021]


def _image(size, seed=0):
    """Random 16 px blocks (structure at every scale, so a wrong field of view shows), white
    right quarter (background)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 230, (size // 16, size // 16, 3), dtype=np.uint8)
    img = np.kron(coarse, np.ones((16, 16, 1), np.uint8))
    img[:, size * 3 // 4 :] = 255
    return img


def _manifest(tmp_path, rows) -> Path:
    table = tmp_path / "slides.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    return table


# -- magnification from MPP -------------------------------------------------------------
@pytest.mark.parametrize("mpp,mag", [(m, 40.0) for m in MPP_40X] + [(m, 20.0) for m in MPP_20X])
def test_real_mpp_values_snap_to_the_nominal_magnification(mpp, mag):
    assert snap_magnification(mpp) == mag
    base, measured, source = resolve_base_mag({"openslide.mpp-x": str(mpp)})
    assert (base, measured, source) == (mag, mpp, "mpp")


def test_mpp_far_from_every_nominal_magnification_is_rejected_with_the_fix():
    with pytest.raises(SlideError, match=r"mpp 0.33 um/px gives 30.30x.*set objective_power"):
        snap_magnification(0.33)


def test_manifest_corrections_win_over_slide_metadata():
    aperio = {"openslide.objective-power": "20", "openslide.mpp-x": "0.5021"}
    assert resolve_base_mag(aperio) == (20.0, 0.5021, "objective-power")
    # the user corrects a wrong AppMag: the manifest wins, the measured MPP is kept
    assert resolve_base_mag(aperio, objective_power="40") == (40.0, 0.5021, "manifest objective_power")
    assert resolve_base_mag(aperio, mpp="0.2527") == (40.0, 0.2527, "manifest mpp")
    assert resolve_base_mag({}, objective_power="40", mpp="0.2428")[2] == "manifest objective_power"


@pytest.mark.parametrize("tile_px", [64, 224])
def test_generic_tiffs_with_real_mpp_pass_the_manifest(tmp_path, tile_px):
    """Generic TIFFs carrying only an MPP (no objective power) at default and paper tile sizes:
    snapped, recorded with the measured MPP and the source, tiled without an error."""
    mpps = MPP_40X + MPP_20X
    for n, mpp in enumerate(mpps):
        write_pyramid(tmp_path / f"s{n}.tif", _image(1024, n), objective_power=None, mpp=mpp)
    # s5 says 20x in its metadata; the manifest row corrects it to 40x
    write_pyramid(tmp_path / "s5.svs", _image(1024, 5), objective_power=20, mpp=0.5021)
    rows = {"slide_id": [f"s{n}" for n in range(6)], "path": [f"s{n}.tif" for n in range(5)] + ["s5.svs"],
            "objective_power": [""] * 5 + ["40"]}
    checked, rejected = check_manifest(_manifest(tmp_path, rows), MAGS, tile_px, "error", 0.3, 0)
    got = checked.set_index("slide_id")
    assert rejected.empty
    assert list(got["base_mag"]) == [40.0, 40.0, 40.0, 20.0, 20.0, 40.0]
    assert np.allclose(got["mpp"], mpps + [0.5021], atol=1e-6)
    assert list(got["mag_source"]) == ["mpp"] * 5 + ["manifest objective_power"]
    assert list(got["lacking"]) == ["", "", "", "40x", "40x", ""]
    grid, *_ = tile_slide(got.loc["s3"].to_dict() | {"slide_id": "s3"}, MAGS, tile_px, 0.5)
    assert set(grid["mag"]) == {2.5, 10.0} and (grid["size0"] == grid["tile_px"] * 20 / grid["mag"]).all()


# -- sparse tiles --------------------------------------------------------------------------
def _make_sparse(path, tile_index: int, level: int = 0):
    """Empty one stored tile (offset and byte count 0), as scanners do for blank areas."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[level]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
        offsets[tile_index] = counts[tile_index] = 0
        page.tags["TileOffsets"].overwrite(offsets)
        page.tags["TileByteCounts"].overwrite(counts)


def test_sparse_tiles_read_as_background_like_openslide(tmp_path):
    path = tmp_path / "sparse.tif"
    write_pyramid(path, _image(1024), objective_power=None, mpp=0.2527)
    _make_sparse(path, 1)  # level 0, tile (0, 1): x 256-511, y 0-255
    _make_sparse(path, 0, level=1)
    with SlideReader(path) as reader:
        assert reader.backend == "tifffile"
        region = reader.read_level_region(0, 192, 0, 128, 64)  # half stored, half sparse
        assert (region[:, 64:] == BACKGROUND).all() and (region[:, :64] != BACKGROUND).any()
        rgba = np.asarray(openslide.OpenSlide(str(path)).read_region((192, 0), 0, (128, 64)))
        expected = np.where(rgba[..., 3:] == 0, BACKGROUND, rgba[..., :3])
        assert np.array_equal(region, expected)
        assert (reader.read_level_region(1, 0, 0, 64, 64) == BACKGROUND).all()
    table = _manifest(tmp_path, {"slide_id": ["sparse"], "path": [path.name]})
    checked, _ = check_manifest(table, MAGS, 64, "error", 0.3, 0)
    grid, *_ = tile_slide(checked.iloc[0].to_dict(), MAGS, 64, 0.5)
    with SlideReader(path) as reader:
        tiles = reader.read_tiles(grid)  # every tile of every magnification, the sparse ones too
    assert tiles.shape == (len(grid), 64, 64, 3)


# -- corrupt tiles (issue 23, item 5) ---------------------------------------------------------
def _zero_tile(path, tile_index: int, level: int = 0):
    """Overwrite one stored tile's data with zeros (offsets and byte counts kept)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        offset, count = page.dataoffsets[tile_index], page.databytecounts[tile_index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(count))


def test_corrupt_tile_is_named_at_the_manifest_and_wherever_it_is_read(tmp_path):
    for name in ("good", "corrupt"):
        write_pyramid(tmp_path / f"{name}.svs", _image(1024, 3), objective_power=40, mpp=0.25)
    _zero_tile(tmp_path / "corrupt.svs", 5)  # level 0 (4 x 4 tiles of 256 px): row 1, column 1
    table = _manifest(tmp_path, {"slide_id": ["good", "corrupt"], "path": ["good.svs", "corrupt.svs"]})
    with pytest.raises(ManifestError) as err:
        check_manifest(table, MAGS, 64, "error", 0.5, 0)
    line = next(ln for ln in str(err.value).splitlines() if "- corrupt:" in ln)
    assert "corrupt.svs: corrupt tile: the stored tile at level 0, row 1, column 1 (level pixels x 256, y 256)" in line
    checked, rejected = check_manifest(table, MAGS, 64, "skip", 0.5, 0)  # skip: left out, with the cause
    assert list(checked["slide_id"]) == ["good"] and list(rejected["slide_id"]) == ["corrupt"]
    assert "corrupt tile" in rejected["cause"].iloc[0]
    # read anyway (embed, training): the error names the slide, the level and the tile
    with SlideReader(tmp_path / "corrupt.svs") as reader:
        with pytest.raises(SlideError, match=r"corrupt.svs: stored tile at level 0, row 1, column 1 "
                                             r"\(level pixels x 256, y 256; level-0 x 256, y 256\) cannot be decoded"):
            reader.read_level_region(0, 300, 300, 64, 64)
        assert reader.read_level_region(0, 0, 0, 256, 256).shape == (256, 256, 3)  # the others still read


# -- CLAM and TRIDENT readers ----------------------------------------------------------------
# Their reading code, step for step, as in CLAM 53e2409 (dataset_modules/dataset_h5.py) and
# TRIDENT a91fa84 (trident/wsi_objects/WSI.py, WSIPatcher.py, OpenSlideWSI.py);
# studies/interop_upstream.py runs the tools' own code on the workflow's outputs.
def clam_read(slide_path, coords_path):
    """CLAM's Whole_Slide_Bag_FP.__getitem__: read_region(coord, patch_level, (patch_size,
    patch_size)).convert('RGB') for each level-0 (x, y)."""
    with h5py.File(coords_path, "r") as f:
        level, size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
        coords = f["coords"][:]
    wsi = openslide.OpenSlide(str(slide_path))
    return [np.asarray(wsi.read_region(tuple(xy), level, (size, size)).convert("RGB")) for xy in coords]


def trident_level(level_downsamples, downsample, tolerance=0.1):
    """TRIDENT's WSI.get_best_level_and_custom_downsample (level only): a level within an
    absolute `tolerance` of the downsample, else the coarsest level not above it (upsampling:
    the finest level at or above it)."""
    for level, d in enumerate(level_downsamples):
        if abs(d - downsample) <= tolerance:
            return level
    if downsample >= level_downsamples[0]:
        return max(level for level, d in enumerate(level_downsamples) if d <= downsample)
    return min(level for level, d in enumerate(level_downsamples) if d >= downsample)


def trident_read(slide_path, coords_path):
    """TRIDENT's WSI.extract_patch_features: read_coords (KeyError without patch_size,
    level0_magnification, target_magnification), create_patcher(src_mag, dst_mag,
    custom_coords, pil=True): downsample = (10 / dst) / (10 / src), patch_size_src =
    round(patch_size * downsample), the level of get_best_level_and_custom_downsample(
    downsample, tolerance=0.1), patch_size_level = round(patch_size_src / int(level
    downsample)); get_tile_xy: read_region(xy, level, patch_size_level).convert('RGB'),
    PIL resize to patch_size (Pillow's default filter, bicubic)."""
    with h5py.File(coords_path, "r") as f:
        attrs, coords = dict(f["coords"].attrs), f["coords"][:]
    patch_size, src, dst = (attrs[k] for k in ("patch_size", "level0_magnification", "target_magnification"))
    wsi = openslide.OpenSlide(str(slide_path))
    downsample = (10 / dst) / (10 / src)
    level = trident_level(wsi.level_downsamples, downsample)
    size = round(round(patch_size * downsample) / int(wsi.level_downsamples[level]))
    return [np.asarray(wsi.read_region((x, y), level, (size, size)).convert("RGB").resize((patch_size, patch_size)))
            for x, y in coords]


def _as_tile(patch, tile_px):
    return np.asarray(Image.fromarray(patch).resize((tile_px, tile_px), Image.BOX), np.float32)


def _tiled(tmp_path, name, mpp, objective_power=None):
    path = tmp_path / f"{name}.tif"
    write_pyramid(path, _image(2048, 7), objective_power=objective_power, mpp=mpp)
    checked, _ = check_manifest(_manifest(tmp_path, {"slide_id": [name], "path": [path.name]}), MAGS, 64,
                                "error", 0.3, 0)
    slide = checked.iloc[0].to_dict()
    grid, *_ = tile_slide(slide, MAGS, 64, 0.5)
    coords = {}
    for mag in MAGS:
        coords[mag] = tmp_path / "coords" / f"{mag:g}x" / f"{name}.h5"
        write_coords_h5(grid, slide, mag, 64, coords[mag])
    return path, slide, grid, coords


@pytest.mark.parametrize("mpp,lacking", [(0.5021, {40.0}), (0.2527, set())])
def test_coords_read_the_tile_footprint_with_clam_and_trident(tmp_path, mpp, lacking):
    """20x scan: 10x and 2.5x are resized from finer levels, 40x is lacking; 40x scan: native.
    Both readers cover exactly madflow's tile (same pixels after resizing to T)."""
    path, slide, grid, coords = _tiled(tmp_path, "scan", mpp)
    reader = SlideReader(path)
    for mag in MAGS:
        with h5py.File(coords[mag], "r") as f:
            attrs, n = dict(f["coords"].attrs), len(f["coords"])
        for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                    "level0_width", "level0_height", "overlap", "name", "patch_level"):
            assert key in attrs, (mag, key)
        assert (attrs["level0_width"], attrs["level0_height"]) == (2048, 2048)
        assert attrs["lacking"] == (mag in lacking) and attrs["magnification"] == mag
        rows = grid[(grid["mag"] == mag) & grid["tissue"]]
        assert n == len(rows) and (n == 0) == (mag in lacking)
        clam, trident = clam_read(path, coords[mag]), trident_read(path, coords[mag])  # no KeyError
        assert len(clam) == len(trident) == n
        for patch_c, patch_t, row in zip(clam[:8], trident[:8], rows.head(8).to_dict("records")):
            assert patch_c.shape[0] * reader.level_downsamples[int(attrs["patch_level"])] == pytest.approx(row["size0"])
            mine = reader.read_tile(row).astype(np.float32)
            assert np.abs(_as_tile(patch_c, 64) - mine).mean() < 3
            assert np.abs(_as_tile(patch_t, 64) - mine).mean() < 3
            if mine.std() > 30:  # textured: a quarter of the footprint (half the side) reads apart
                half = patch_c[: len(patch_c) // 2, : len(patch_c) // 2]
                assert np.abs(_as_tile(half, 64) - mine).mean() > 15
    with h5py.File(coords[10.0], "r") as f:
        assert f["coords"].attrs["native"] == (mpp < 0.3)  # 10x of a 20x scan is resized


def _odd_slide(path):
    """A 40x slide of 2030 x 1750 px, tissue up to its right and bottom edges: its sides are
    not multiples of the 2.5x footprint (1024 px at T = 64) and OpenSlide reports level
    downsamples 4.0043 and 16.08, not whole numbers."""
    rng = np.random.default_rng(5)
    blocks = rng.integers(40, 230, (176, 204, 3), dtype=np.uint8)
    write_pyramid(path, np.kron(blocks, np.ones((10, 10, 1), np.uint8))[:1750, :2030])
    return path


def test_edge_tiles_are_never_exported_so_clam_trident_and_madflow_read_the_same(tmp_path):
    """The edge-tile rule (docs/slides.md): a tile whose pixels run past the slide's right or
    bottom edge (at level 0 or at the level it is read from) stays in the table with
    inside = False and is never a tissue tile, so every exported coord reads only slide
    pixels, in madflow and in CLAM's and TRIDENT's readers alike."""
    path = _odd_slide(tmp_path / "odd.svs")
    ds = openslide.OpenSlide(str(path)).level_downsamples
    assert ds[1] != round(ds[1]) and ds[2] != round(ds[2])
    checked, _ = check_manifest(_manifest(tmp_path, {"slide_id": ["odd"], "path": [path.name]}), MAGS, 64,
                                "error", 0.3, 0)
    slide = checked.iloc[0].to_dict()
    grid, *_ = tile_slide(slide, MAGS, 64, 0.5)
    past = (grid["x0"] + grid["size0"] > 2030) | (grid["y0"] + grid["size0"] > 1750)
    assert (~grid.loc[past, "inside"]).all() and not grid.loc[~grid["inside"], "tissue"].any()
    assert (grid.loc[past, "tissue_frac"] >= 0.5).any()  # tissue there: the rule, not the mask, leaves them out
    reader, wsi = SlideReader(path), openslide.OpenSlide(str(path))
    for mag in MAGS:
        coords = tmp_path / f"{mag:g}x.h5"
        write_coords_h5(grid, slide, mag, 64, coords)
        rows = grid[(grid["mag"] == mag) & grid["tissue"]]
        assert len(rows) > 0
        with h5py.File(coords, "r") as f:
            level, size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
        for x, y in rows[["x0", "y0"]].to_numpy():  # OpenSlide: transparent = outside the slide
            assert (np.asarray(wsi.read_region((int(x), int(y)), level, (size, size)))[..., 3] == 255).all()
        mine = reader.read_tiles(rows).astype(np.float32)
        for read in (clam_read, trident_read):
            theirs = np.stack([_as_tile(p, 64) for p in read(path, coords)])
            if mag == 40.0:  # level 0: the same pixels
                assert np.array_equal(theirs, mine), read.__name__
            else:  # OpenSlide maps x to x / 4.0043 and interpolates: sub-pixel shifts, not padding
                assert np.abs(theirs - mine).mean(axis=(1, 2, 3)).max() < 15, read.__name__


def test_exported_features_load_like_clam_and_trident_mil(tmp_path):
    """Embed a 20x scan (colour statistics: no training needed), export, and load the way
    CLAM's and TRIDENT's MIL loaders do: root-level features [N, D] and coords [N, 2] in
    h5_files/, the tensor in pt_files/; each feature is the one of the patch CLAM reads."""
    torch = pytest.importorskip("torch")
    from madflow.embed import build_encoder, embed_slide, l2_normalise
    from madflow.features import export_slide, trident_folder

    path, slide, grid, coords = _tiled(tmp_path, "scan20", 0.4990)
    table = tmp_path / "scan20.parquet"
    grid.to_parquet(table)
    encode, name = build_encoder({"mode": "color_stats"}, None, 64)
    embedded = tmp_path / "embeddings" / "scan20.h5"
    embed_slide(str(table), encode, name, str(embedded), 64)
    out = tmp_path / "features"
    h5s = [out / f"{m:g}x" / "h5_files" / "scan20.h5" for m in MAGS]
    pts = [out / f"{m:g}x" / "pt_files" / "scan20.pt" for m in MAGS]
    trident = out / "trident"  # a TRIDENT job folder, as its Processor lays it out
    patches = [trident / trident_folder(m, 64) / "patches" / "scan20_patches.h5" for m in MAGS]
    feats = [trident / trident_folder(m, 64) / "features_madflow" / "scan20.h5" for m in MAGS]
    assert [p.parent.parent.name for p in patches] == ["2.5x_64px_0px_overlap", "10x_64px_0px_overlap",
                                                       "40x_64px_0px_overlap"]
    counts = export_slide(embedded, [coords[m] for m in MAGS], h5s, pts, MAGS, patches, feats)
    assert counts[2] == 0 and min(counts[:2]) > 0  # 40x lacking on a 20x scan
    for mag, h5_path, pt_path, patch_path, feat_path in zip(MAGS, h5s, pts, patches, feats):
        assert patch_path.read_bytes() == coords[mag].read_bytes()
        with h5py.File(feat_path, "r") as f, h5py.File(h5_path, "r") as g:
            assert np.array_equal(f["features"][:], g["features"][:]) and np.array_equal(f["coords"][:], g["coords"][:])
        with h5py.File(h5_path, "r") as f:  # TRIDENT / CLAM h5_files
            features, xy, attrs = f["features"][:], f["coords"][:], dict(f["coords"].attrs)
        with h5py.File(coords[mag], "r") as f:
            assert np.array_equal(xy, f["coords"][:]) and attrs == dict(f["coords"].attrs)
        assert features.shape == (len(xy), 6) and xy.shape == (len(xy), 2)
        bag = torch.load(pt_path)  # CLAM's Generic_MIL_Dataset
        assert torch.equal(bag, torch.from_numpy(features))
        if len(xy):
            patches = np.stack([_as_tile(p, 64).round().astype(np.uint8) for p in clam_read(path, coords[mag])])
            assert np.allclose(features, l2_normalise(encode(patches)), atol=2e-3)


def test_docs_name_what_the_code_writes():
    """docs/CONTRACTS.md and docs/slides.md once said patch_size = tile_px and embeddings in
    embeddings/{slide_id}.h5; the code writes the pixels read at patch_level and part folders."""
    slides, contracts = ((REPO / "docs" / name).read_text() for name in ("slides.md", "CONTRACTS.md"))
    assert "embeddings/{slide_id}.h5" not in slides and "embeddings/part{k}/{slide_id}.h5" in slides
    assert "`patch_size`\n(`tile_px`;" not in contracts and "(the pixels read at `patch_level`" in contracts


def test_export_refuses_embeddings_of_other_tiles(tmp_path):
    from madflow.features import export_slide

    _, _, _, coords = _tiled(tmp_path, "s", 0.2527)
    embedded = tmp_path / "e.h5"
    with h5py.File(embedded, "w") as h5:
        h5.attrs["encoder"] = "x"
        g = h5.create_group("10x")
        g.attrs["magnification"] = 10.0
        g.create_dataset("features", data=np.zeros((1, 4), np.float32))
        g.create_dataset("coords", data=np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"e.h5 \[10x\] holds 1 tiles that differ"):
        export_slide(embedded, [coords[10.0]], [tmp_path / "o.h5"], [tmp_path / "o.pt"], [10.0])


# -- the workflow on real-world slides ----------------------------------------------------------
def test_tiles_target_on_real_world_slides(tmp_path):
    """`snakemake tiles` with the default settings (bad_slides: error) on generic TIFFs that
    carry only a real 40x or 20x MPP, and on the real TCGA slide (no MPP, no objective power:
    its manifest row gives objective_power)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    rows = {"slide_id": [], "path": [], "objective_power": []}
    for n, mpp in enumerate([0.2630, 0.4990]):
        write_pyramid(slides / f"mpp{n}.tif", _image(1024, n), objective_power=None, mpp=mpp)
        rows["slide_id"].append(f"mpp{n}")
        rows["path"].append(f"mpp{n}.tif")
        rows["objective_power"].append("")
    if TCGA.exists():
        rows["slide_id"].append("tcga")
        rows["path"].append(str(TCGA))
        rows["objective_power"].append("20")
    table = _manifest(slides, rows)
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(merged_config({"manifest": str(table)})))
    run_snakemake(work, "tiles", "--cores", "2")
    manifest = pd.read_csv(work / "results" / "manifest.tsv", sep="\t").set_index("slide_id")
    assert manifest.loc["mpp0", "base_mag"] == 40 and manifest.loc["mpp1", "base_mag"] == 20
    assert manifest.loc["mpp0", "mpp"] == pytest.approx(0.2630)
    for slide_id in rows["slide_id"]:
        table = pd.read_parquet(work / "results" / "tiles" / f"{slide_id}.parquet")
        assert table["tissue"].any(), slide_id
        with h5py.File(work / "results" / "tiles" / "coords" / "10x" / f"{slide_id}.h5", "r") as f:
            assert f["coords"].attrs["level0_magnification"] == manifest.loc[slide_id, "base_mag"]
    if not TCGA.exists():
        pytest.skip(f"the real slide {TCGA} is absent: ran on the synthetic slides only")
    assert manifest.loc["tcga", "mag_source"] == "manifest objective_power"
    assert manifest.loc["tcga", "lacking"] == "40x"
