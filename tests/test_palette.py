"""igpt_cli.palette: the quantization rule (exact nearest centre, ties, the lookup tables),
decoding, palette sources and fitting."""
from __future__ import annotations

import json

import numpy as np
import pytest

from igpt_cli.errors import InputError, ParameterError
from igpt_cli.palette import DEFAULT_PALETTE, MAX_K, Palette, PaletteError, fit_palette


def test_default_palette_is_the_official_one(official_palette_path):
    a = np.load(DEFAULT_PALETTE)
    assert a.dtype == np.float32 and a.shape == (512, 3)
    np.testing.assert_array_equal(a, np.load(official_palette_path))


def test_nearest_is_exact_and_lut_agrees():
    pal = Palette.default()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6000, 3), dtype=np.uint8)
    x = rgb.astype(np.float64) / 127.5 - 1
    d = ((x[:, None, :] - pal.centers.astype(np.float64)[None]) ** 2).sum(-1)
    brute = d.argmin(1)
    np.testing.assert_array_equal(pal.nearest(rgb), brute)
    imgs = rgb.reshape(6, 20, 50, 3)
    t1 = pal.quantize(imgs)  # fills the table
    t2 = pal.quantize(imgs)  # reads it
    assert t1.dtype == np.uint16 and t1.shape == (6, 1000)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(t1.reshape(-1), brute)


def test_small_palette_ties_go_to_lowest_index():
    # two identical centres: a full argmin picks the first
    pal = Palette(np.array([[0.5, 0.5, 0.5], [-1, -1, -1], [0.5, 0.5, 0.5]], dtype=np.float32))
    t = pal.quantize(np.full((1, 2, 2, 3), 200, np.uint8))
    assert set(t.ravel().tolist()) == {0}


def test_decode_roundtrip():
    pal = Palette.default()
    centres_rgb = np.clip(np.rint((pal.centers.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    toks = np.arange(512, dtype=np.uint16).reshape(2, 256)
    imgs = pal.decode(toks, 16, 16)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs.reshape(-1, 3), centres_rgb)


def test_palette_sources(tmp_path, official_palette_path):
    c = np.load(official_palette_path)
    cfg = tmp_path / "model" / "preprocessor_config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"clusters": c.tolist(), "do_color_quantize": True}))
    for spec in (official_palette_path, cfg, cfg.parent):
        np.testing.assert_allclose(Palette.load(spec).centers, c, atol=1e-7)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 4), np.float32))
    with pytest.raises(PaletteError, match="shape"):
        Palette.load(bad)
    np.save(bad, np.full((10, 3), 3.0, np.float32))
    with pytest.raises(PaletteError, match=r"\[-1, 1\]"):
        Palette.load(bad)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(PaletteError, match="clusters"):
        Palette.load(tmp_path / "x.json")


def test_shipped_lookup_table_is_the_exact_nearest_centre_of_every_colour():
    from igpt_cli.palette import SHIPPED_LUT, _shipped_lut

    pal = Palette.default()
    shipped = _shipped_lut(pal.sha256)
    assert shipped is not None and SHIPPED_LUT.stat().st_size < 2 << 20
    np.testing.assert_array_equal(shipped, pal.full_lookup_table())  # recomputed from the centres, all 2^24
    # a palette from elsewhere (here: the same centres perturbed) does not use it
    other = Palette(pal.centers * np.float32(0.999))
    assert _shipped_lut(other.sha256) is None


def test_fit_palette_finds_the_colours_and_names_bad_parameters():
    # four flat colours: k-means with k=4 recovers them exactly; k=8 is capped at the 4 distinct colours
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [40, 80, 200]], np.uint8)
    imgs = np.repeat(colours, 64, axis=0).reshape(4, 8, 8, 3)
    for k in (4, 8):
        pal = fit_palette([imgs[:2], imgs[2:]], k=k, sample_pixels=10_000)
        assert pal.k == 4
        got = np.clip(np.rint((pal.centers.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, colours.tolist()))
    for k in (0, MAX_K + 1):
        with pytest.raises(ParameterError, match=rf"^k={k}: must be between 1 and {MAX_K}"):
            fit_palette([imgs], k=k)
    with pytest.raises(ParameterError, match=r"^sample_pixels=0: "):
        fit_palette([imgs], k=4, sample_pixels=0)
    with pytest.raises(InputError, match="no pixels"):
        fit_palette([], k=4)
