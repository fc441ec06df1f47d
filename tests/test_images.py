import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from duch.data.images import ImageLoadError, load_image, raster_to_rgb8

from .conftest import ASSETS


def test_real_jpeg_and_odd_sizes():
    assert load_image(ASSETS / "102.jpg").size == (256, 256)
    assert load_image(ASSETS / "156.jpg").size == (253, 256)
    assert load_image(ASSETS / "497.jpg").mode == "RGB"


def test_original_uc_merced_tiff_reads_as_pil_does():
    ours = np.asarray(load_image(ASSETS / "1.tif"))
    pil = np.asarray(Image.open(ASSETS / "1.tif").convert("RGB"))
    assert ours.shape == (256, 256, 3) and np.array_equal(ours, pil)


def test_raster_rule_pins_the_stretch():
    # Joint 2-98 percentile stretch over the first three bands; NIR (band 4) dropped.
    band = np.arange(100, dtype=np.uint16).reshape(10, 10) * 40  # 0..3960
    raster = np.stack([band, band // 2, band, np.full_like(band, 60000)], axis=-1)
    rgb = raster_to_rgb8(raster)
    low, high = np.percentile(raster[:, :, :3].astype(float), [2, 98])
    expected_r = np.round(np.clip((band - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (10, 10, 3)
    assert np.array_equal(rgb[:, :, 0], expected_r)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert rgb[5, 5, 1] < rgb[5, 5, 0]  # colour balance kept: one stretch for all bands


def test_band_first_and_single_band_rasters():
    assert raster_to_rgb8(np.zeros((4, 20, 30), np.uint8)).shape == (20, 30, 3)
    grey = raster_to_rgb8(np.full((5, 6), 7, np.uint8))
    assert grey.shape == (5, 6, 3) and (grey == 7).all()


def test_16bit_four_band_tiff(tmp_path):
    rng = np.random.default_rng(0)
    raster = rng.integers(200, 3000, size=(40, 50, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgbn.tif", raster)
    img = load_image(tmp_path / "rgbn.tif")
    assert img.size == (50, 40) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), raster_to_rgb8(raster))


def test_palette_png_with_transparency_composites_on_black(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[1, 1]) == (0, 255, 0)


def test_cmyk_and_exif_rotated_jpegs(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rgb = np.asarray(load_image(tmp_path / "cmyk.jpg"))
    assert rgb.shape == (6, 8, 3) and rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (30, 10), "white").save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 30)


def test_bad_files_give_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture")
    data = (ASSETS / "102.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    cases = {"missing.jpg": "missing file", "empty.jpg": "empty file (0 bytes)",
             "text.jpg": "not a recognised image", "cut.jpg": "truncated image file"}
    for name, reason in cases.items():
        with pytest.raises(ImageLoadError, match=re.escape(reason)):
            load_image(tmp_path / name)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("L", (400, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the same check PIL runs at 89 Mpx by default
    with pytest.raises(ImageLoadError, match="image too large"):
        load_image(tmp_path / "big.png")


def test_bytes_in_memory_follow_the_same_rules_as_files(tmp_path):
    """An upload is decoded as its file would be: JPEG, TIFF (told by its magic bytes, whatever its name), a
    16-bit 4-band raster, and the same one-line reasons for what is refused."""
    from duch.data.images import load_image_bytes

    for name in ("102.jpg", "1.tif"):
        assert np.array_equal(np.asarray(load_image_bytes((ASSETS / name).read_bytes())),
                              np.asarray(load_image(ASSETS / name)))
    raster = np.random.default_rng(0).integers(0, 4000, (8, 9, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "nir.tif", raster)
    assert np.array_equal(np.asarray(load_image_bytes((tmp_path / "nir.tif").read_bytes())),
                          raster_to_rgb8(raster))
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        load_image_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image_bytes(b"")
