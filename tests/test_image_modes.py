"""Every PIL mode a medical or document image arrives in becomes the 8-bit RGB picture a person would see
(`nvila_ft.model.image_processing.to_rgb`), in training (processor), preflight and the app alike."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nvila_ft.data import preflight
from nvila_ft.model.image_processing import TilingConfig, tile_image, tiles_to_uint8, to_rgb
from nvila_ft.model.processing import _open_image

W, H = 64, 32


def gradient(high: float, dtype) -> np.ndarray:
    """A left-to-right ramp from 0 to `high` (H x W)."""
    return np.tile(np.linspace(0, high, W), (H, 1)).astype(dtype)


def check_ramp(rgb: Image.Image) -> None:
    a = np.asarray(rgb)
    assert rgb.mode == "RGB" and a.shape == (H, W, 3)
    row = a[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # the full 8-bit range, not clipped to white
    assert (np.diff(row) >= 0).all() and len(set(row.tolist())) > W // 2  # a ramp, not a step
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_12_bit_radiograph_in_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "ct.png"
    Image.fromarray(gradient(4095, np.uint16)).save(path)  # 12-bit data in a 16-bit grayscale PNG
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # I;16 (or I on older Pillow)
    rgb = _open_image(str(path))
    check_ramp(rgb)
    assert (np.asarray(rgb) == 255).mean() < 0.05  # convert("RGB") made 98.8% of it white


@pytest.mark.parametrize("mode,high,dtype", [("I;16", 4095, np.uint16), ("I;16B", 60000, ">u2"),
                                             ("I", 100000, np.int32), ("F", 3.5, np.float32)])
def test_high_bit_depth_modes_are_scaled_to_their_range(mode, high, dtype):
    image = Image.fromarray(gradient(high, dtype)) if mode != "I;16B" else \
        Image.frombytes("I;16B", (W, H), gradient(high, ">u2").tobytes())
    assert image.mode == mode
    check_ramp(to_rgb(image))


def test_float_image_with_negative_values_and_nan():
    a = gradient(2.0, np.float32) - 1.0
    a[0, 1] = np.nan
    rgb = np.asarray(to_rgb(Image.fromarray(a)))
    assert rgb.min() == 0 and rgb.max() == 255


def test_constant_high_bit_depth_image_becomes_black_not_an_error():
    assert np.asarray(to_rgb(Image.fromarray(np.full((H, W), 700, np.uint16)))).max() == 0


def _black_text_on_transparent(mode: str) -> Image.Image:
    rgba = np.zeros((H, W, 4), np.uint8)  # transparent black everywhere ...
    rgba[8:24, 8:24] = (0, 0, 0, 255)  # ... and an opaque black square (the "text")
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        return image.convert("LA")
    if mode == "P":  # palette: index 0 (transparent) and index 1 are both black
        p = Image.fromarray((rgba[..., 3] > 0).astype(np.uint8), "P")
        p.putpalette([0, 0, 0, 0, 0, 0])
        p.info["transparency"] = 0
        return p
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    image = _black_text_on_transparent(mode)
    assert image.mode == mode
    a = np.asarray(to_rgb(image))
    assert (a[0, 0] == 255).all()  # transparent background: white, as a viewer shows it (convert gave black)
    assert (a[16, 16] == 0).all()  # the opaque content stays black


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK"])
def test_8_bit_modes_convert_as_the_official_pipeline(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_tiles_of_a_16_bit_image_span_the_range():
    tiles, _ = tile_image(Image.fromarray(gradient(4095, np.uint16)), TilingConfig(image_aspect_ratio="resize"))
    pixels = tiles_to_uint8(tiles)
    assert pixels.min() == 0 and pixels.max() == 255 and (pixels == 255).mean() < 0.05


def test_preflight_passes_scaled_modes_and_refuses_a_conversion_that_loses_the_picture(tmp_path, monkeypatch):
    good = tmp_path / "ct.png"
    Image.fromarray(gradient(3095, np.uint16) + 1000).save(good)  # a CT-like ramp from 1000 to 4095
    blank = tmp_path / "blank.png"
    Image.new("L", (W, H), 128).save(blank)  # a blank source is the data's own business
    rows = [{"id": str(i), "images": [str(p)], "source": "t.json", "index": i,
             "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}
            for i, p in enumerate([good, blank])]
    assert len(preflight(rows, on_bad_row="skip", progress=False).ok) == 2

    import nvila_ft.data.checks as checks

    monkeypatch.setattr(checks, "to_rgb", lambda im: im.convert("RGB"))  # the old, clipping conversion
    report = preflight(rows, on_bad_row="skip", progress=False)
    assert [r.id for r in report.bad] == ["0"] and "flat colour" in report.bad[0].reason


def test_an_rgb_file_read_inside_a_with_block_stays_usable_after_it(tmp_path):
    # Frames folders (video.load_video) and image paths (processing._open_image) convert inside
    # `with Image.open(...)`; returning the still-lazy original crashed at the first resize once closed.
    path = tmp_path / "frame.png"
    pixels = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    Image.fromarray(pixels, mode="RGB").save(path)
    with Image.open(path) as im:
        rgb = to_rgb(im)
    assert np.array_equal(np.asarray(rgb.resize((5, 6))), np.asarray(Image.fromarray(pixels).resize((5, 6))))
    assert np.array_equal(np.asarray(_open_image(str(path))), pixels)
