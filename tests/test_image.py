"""Image io: every mode to RGB, EXIF orientation, bombs, truncated and non-image files, resize/normalize, boxes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal.image import CLIP_MEAN, CLIP_STD, ImageError, draw_boxes, from_tensor, load_image, to_tensor


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def rgb(generator) -> Image.Image:
    pixels = torch.randint(0, 256, (24, 32, 3), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("mode", ["P", "L", "1", "CMYK", "I;16", "I", "F", "LA", "RGBA", "PA", "YCbCr", "HSV"])
def test_every_mode_becomes_rgb(rgb, mode):
    source = rgb.convert("L").convert(mode) if mode in ("I;16", "I", "F") else rgb.convert(mode)
    image = load_image(source)
    assert image.mode == "RGB" and image.size == rgb.size
    if mode in ("L", "CMYK", "RGBA", "YCbCr"):  # lossless enough to compare against the original
        difference = np.abs(np.asarray(image, dtype=int) - np.asarray(rgb.convert(mode).convert("RGB"), dtype=int))
        assert difference.max() <= 1


@pytest.mark.parametrize("fmt,mode", [("TIFF", "CMYK"), ("PNG", "P"), ("PNG", "I;16"), ("TIFF", "F"), ("GIF", "P")])
def test_modes_survive_the_file_round_trip(rgb, fmt, mode):
    source = rgb.convert("L").convert(mode) if mode in ("I;16", "F") else rgb.convert(mode)
    image = load_image(png_bytes(source, fmt))
    assert image.mode == "RGB" and image.size == rgb.size


def test_transparency_goes_onto_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    image = load_image(rgba)
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (10, 20, 30)
    half = Image.new("LA", (2, 2), (0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)


def test_sixteen_bit_is_rescaled_not_clipped():
    values = np.array([[0, 1000], [30000, 60000]], dtype=np.uint16)
    image = load_image(Image.fromarray(values).convert("I;16"))
    grey = [image.getpixel((x, y))[0] for y in range(2) for x in range(2)]
    expected = [round(v / 60000 * 255) for v in (0, 1000, 30000, 60000)]
    assert grey == expected


def test_exif_orientation_is_applied(rgb):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(png_bytes(rgb, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (rgb.height, rgb.width)


def test_decompression_bomb_is_refused(rgb):
    with pytest.raises(ImageError, match="above the limit of 100"):
        load_image(png_bytes(rgb), max_pixels=100)


def test_truncated_and_non_image_files(tmp_path, rgb):
    data = png_bytes(rgb, "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    text = tmp_path / "notes.png"
    text.write_text("hello, not a picture")
    with pytest.raises(ImageError, match="is not an image file"):
        load_image(text)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_to_tensor_matches_slow_normalization(rgb):
    tensor = to_tensor(rgb, 16)
    resized = rgb.resize((16, 16), Image.Resampling.BICUBIC)
    for y, x in [(0, 0), (5, 11), (15, 15)]:
        r, g, b = resized.getpixel((x, y))
        for channel, value in enumerate((r, g, b)):
            expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
            assert abs(tensor[channel, y, x].item() - expected) < 1e-6


def test_from_tensor_round_trip(generator):
    pixels = torch.randint(0, 256, (3, 8, 8), generator=generator).float() / 127.5 - 1
    image = from_tensor(pixels)
    back = torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(back, pixels, atol=1e-6, rtol=0)


def test_draw_boxes_marks_the_outline_only(rgb):
    white = Image.new("RGB", (64, 64), "white")
    drawn = draw_boxes(white, [("", (10, 20, 40, 50))], width=1)
    assert drawn.getpixel((10, 30)) != (255, 255, 255)
    assert drawn.getpixel((25, 35)) == (255, 255, 255)
    assert white.getpixel((10, 30)) == (255, 255, 255)
    labelled = draw_boxes(rgb, [("dog", (2, 2, 20, 20)), ("hat", (5, 5, 9, 9))])
    assert labelled.size == rgb.size
