"""Reading and validating user images: every failure is a clear `InvalidImageError`, raised before any model runs."""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import MMAdaptersError

# 64 megapixels (8000 x 8000): far above what any vision tower uses, far below a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# Wider than a panorama strip; anything beyond is a mistake or an attack, and would resize to a line of pixels.
MAX_ASPECT_RATIO = 50.0
# Image URLs: how long to wait for the server, and how much to read (no photograph needs more).
DOWNLOAD_TIMEOUT_SECONDS = 30.0
MAX_DOWNLOAD_BYTES = 64 * 2**20


class InvalidImageError(MMAdaptersError, ValueError):
    """An image could not be read or is not acceptable (corrupt, truncated, absurd size, unsupported type)."""


def load_image(image: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, what: str = "image") -> Image.Image:
    """Open and validate one image; return it as RGB.

    Accepts a PIL image, a path, an http(s) URL, a base64 string or `data:image/...;base64,` URL, raw bytes, a
    `datasets` image dict ({"bytes", "path"}), or a uint8 array or tensor ((H, W), (H, W, C) or (C, H, W)).
    Grayscale, RGBA/LA (composited on white), palette, CMYK and 16-bit images are converted; EXIF rotation is
    applied. Refuses unreadable or truncated files, more than `max_pixels` pixels (checked from the header, before
    decoding: decompression bombs are never decoded) and aspect ratios beyond 1:50.
    """
    label = f"{what} {str(image)[:200]!r}" if isinstance(image, (str, os.PathLike)) else what
    pil = _open(image, label)
    width, height = pil.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"The {label} is empty ({width}x{height} pixels).")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"The {label} has {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} "
            "(a decompression bomb or an absurd size). Downscale it first, or raise `max_image_pixels`."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidImageError(
            f"The {label} is {width}x{height} pixels: an aspect ratio beyond 1:{MAX_ASPECT_RATIO:.0f} would be "
            "squashed to a line by the vision tower. Crop it first."
        )
    try:
        pil.load()
        pil = ImageOps.exif_transpose(pil)
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(
            f"The {label} is corrupt or truncated and cannot be decoded ({error}). Re-export or re-download it."
        ) from error
    return to_rgb(pil)


def _open(image: Any, label: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return Image.fromarray(_channels_last(image, label))
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        # A `datasets` Image column read without decoding: {"bytes": ..., "path": ...}.
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        image = _download(image, label)
    elif isinstance(image, str) and image.startswith("data:"):
        image = _data_url_bytes(image, label)
    elif isinstance(image, str) and not os.path.isfile(image):
        image = _base64_image_bytes(image) or image  # a missing file is said below
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise InvalidImageError(
                f"The {label} does not exist or is not a file, nor a base64-encoded image."
            )
        source: Any = os.fspath(image)
    elif isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    else:
        raise InvalidImageError(
            f"Unsupported {label} of type {type(image).__name__}: pass a PIL image, a file path, a URL, bytes or a "
            "uint8 array or tensor."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as error:
        raise InvalidImageError(f"Refusing the {label}: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(
            f"The {label} is not a readable image ({error}). Supported: the formats Pillow reads (PNG, JPEG, ...)."
        ) from error


def _data_url_bytes(url: str, label: str) -> bytes:
    """The image in a `data:image/...;base64,` URL (what OpenAI-style clients send), as transformers' `load_image`
    reads it."""
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise InvalidImageError(
            f"The {label} is a data URL that is not base64-encoded: give `data:image/png;base64,...`."
        )
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidImageError(
            f"The {label} is a data URL whose base64 payload does not decode ({error})."
        ) from None


def _base64_image_bytes(text: str) -> bytes | None:
    """The image a string holds as bare base64 (transformers' chat content `{"type": "image", "base64": ...}`), or
    None when it is not base64 or the bytes are no image Pillow recognises (then it was meant as a path)."""
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        return data  # an image: refused with the reason where it is opened again
    except (OSError, SyntaxError, ValueError):
        return None
    return data


def _download(url: str, label: str) -> bytes:
    """An image URL's bytes (as transformers' image processors take URLs), at most MAX_DOWNLOAD_BYTES; the
    checks of `load_image` then apply to them as to a file."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors; ValueError: a malformed URL
        raise InvalidImageError(f"The {label} could not be downloaded ({error}).") from error
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise InvalidImageError(
            f"The {label} is larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB: download and downscale it first."
        )
    return data


def _channels_last(array: np.ndarray, label: str) -> np.ndarray:
    """An (H, W) or (H, W, C) uint8 array for Pillow, from (H, W), (H, W, C) or channels-first (C, H, W) with C of
    1 to 4 (channels last wins where both would fit: the layout of Pillow and numpy images)."""
    if array.dtype != np.uint8:
        raise InvalidImageError(
            f"The {label} is an array of shape {array.shape} and dtype {array.dtype}; images are uint8 (0-255). "
            "From floats in [0, 1]: (array * 255).round().astype(np.uint8) (a tensor: (t * 255).round().byte())."
        )
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first, torch's layout
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 and not (array.ndim == 3 and array.shape[-1] in (2, 3, 4)):
        raise InvalidImageError(
            f"The {label} is an array of shape {array.shape}; expected (H, W), (H, W, C) or (C, H, W) with 1 to 4 "
            "channels."
        )
    return np.ascontiguousarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency over white, 16-bit and float scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scaled = array / 257.0  # 16-bit range onto 8 bits
        else:  # 32-bit int or float: no fixed range, stretch what is there
            low, high = float(array.min()), float(array.max())
            scaled = np.zeros_like(array) if high == low else (array - low) / (high - low) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
