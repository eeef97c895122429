"""Image input/output: load anything a user hands us as an RGB picture, resize/normalize it, draw labelled boxes.

Every failure a user can cause (a truncated file, a file that is not an image, a decompression bomb, an unsupported
mode) raises `ImageError` with one sentence; nothing from deep inside Pillow leaks out.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # imported by the functions that make tensors, so reading an image does not load torch
    import torch

# 64 megapixels: far above any model input, far below a bomb that would exhaust memory once decoded.
DEFAULT_MAX_PIXELS = 64_000_000
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#808000")


class ImageError(ValueError):
    """An image that cannot be used, with a message meant for the user."""


ImageSource = str | Path | bytes | Image.Image


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a path, raw bytes or a PIL image; apply EXIF orientation; return a fully decoded RGB image."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name} does not exist.") from None
        except IsADirectoryError:
            raise ImageError(f"{name} is a directory, not an image file.") from None
        except OSError as error:
            raise ImageError(f"{name} could not be read ({error.strerror or error}).") from None
        if not data:
            raise ImageError(f"{name} is an empty file (0 bytes).")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image file Pillow can read.") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{name} is too large to decode safely.") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"{name} is truncated or corrupt ({error}).") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{name} has {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}."
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name} is empty ({width}x{height}).")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name} is truncated or corrupt ({error}).") from None


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return "The given image"
    if isinstance(source, bytes):
        return f"The uploaded data ({len(source)} bytes)"
    return f"'{source}'"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white, high-bit-depth modes are rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_to_8bit(image).convert("RGB")
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a single-channel integer or float image onto 0..255 by its own value range (16-bit scans, depth maps)."""
    values = np.asarray(image.convert("F"), dtype=np.float64)  # [H, W]
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Resize (not pad) to size x size, as CogVLM does, so per-mille box coordinates stay valid."""
    return image.resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(
    image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """RGB image -> normalized float tensor [3, size, size]."""
    import torch

    resized = resize_square(to_rgb(image), size)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)  # [size*size*3]
    pixels = pixels.view(size, size, 3).permute(2, 0, 1).float() / 255.0  # [3, size, size]
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def from_tensor(pixels: torch.Tensor) -> Image.Image:
    """A [3, H, W] tensor with values in [-1, 1] (the diffusion range) -> RGB image."""
    import torch

    scaled = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, H, W]
    return Image.fromarray(scaled.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def draw_boxes(
    image: Image.Image, boxes: Sequence[tuple[str, tuple[float, float, float, float]]], width: int | None = None
) -> Image.Image:
    """Return a copy of `image` with each (label, (x0, y0, x1, y1) in pixels) drawn as an outlined, labelled box."""
    canvas = to_rgb(image).copy()
    draw = ImageDraw.Draw(canvas)
    line = width or max(1, round(min(canvas.size) / 100))
    font = label_font(max(10, min(canvas.size) // 12), any(not label.isascii() for label, _ in boxes))
    for index, (label, (x0, y0, x1, y1)) in enumerate(boxes):
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        if label:
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            text_width, text_height = right - left + 4, bottom - top + 2
            text_left = max(0, min(x0, canvas.width - text_width))  # inside the image, even near the right edge
            text_top = y0 - text_height if y0 - text_height >= 0 else y0
            draw.rectangle((text_left, text_top, text_left + text_width, text_top + text_height), fill=colour)
            draw.text((text_left + 2 - left, text_top + 1 - top), label, fill="white", font=font)
    return canvas


CJK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/System/Library/Fonts/PingFang.ttc", "C:/Windows/Fonts/msyh.ttc")


def label_font(size: int, needs_cjk: bool) -> ImageFont.ImageFont:
    """Pillow's default font, or for labels beyond ASCII a CJK-capable system font (`make` installs Debian's
    WenQuanYi Micro Hei); without one, the default font and a warning that Chinese labels will show as boxes."""
    if needs_cjk:
        for path in CJK_FONTS:
            if Path(path).exists():
                return ImageFont.truetype(path, size)
        import warnings

        warnings.warn("No CJK font found (install fonts-wqy-microhei); Chinese box labels will show as empty boxes.",
                      stacklevel=3)
    return ImageFont.load_default(size=size)
