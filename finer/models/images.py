"""Images as models receive them: opened whole, cropped to a box, and encoded as bounded JPEG data URLs.

Every step that shows an image to a model (evaluation, grounding, the VLM extractor, training) goes through
these, so a cache key covers the exact pixels sent and a broken file fails the same way everywhere.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from finer.errors import FinerError, one_line

__all__ = [
    "DEFAULT_MAX_IMAGE_SIDE",
    "JPEG_QUALITY",
    "UNREADABLE",
    "crop_box",
    "decode_data_url",
    "encode_image",
    "image_data_url",
    "open_image",
    "unreadable_reason",
]

DEFAULT_MAX_IMAGE_SIDE = 768
#: JPEG quality of images sent to endpoints: visually lossless, a fraction of PNG's size.
JPEG_QUALITY = 90
#: What opening a broken or missing image raises.
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def unreadable_reason(err: BaseException) -> str:
    """Why an image could not be read, in one short line for a skip list."""
    if isinstance(err, FileNotFoundError):
        return "missing file"
    return f"{type(err).__name__}: {one_line(err)}"[:200]


def open_image(path: str | Path | None = None, data: bytes | None = None) -> Image.Image:
    """An image from a file or bytes, fully decoded (a truncated file fails here, not later) in RGB."""
    if data is None and path is None:
        raise ValueError("neither a path nor image bytes")
    with Image.open(io.BytesIO(data) if data is not None else path) as image:
        return image.convert("RGB")


def crop_box(image: Any, box: list[float] | None) -> Any:
    """`image` cropped to `box` (x, y, w, h), or as it is without one."""
    if not box:
        return image
    x, y, w, h = box
    return image.crop((round(x), round(y), round(x + w), round(y + h)))


def image_data_url(image: Image.Image) -> str:
    """The image as a base64 JPEG data URL, the form every OpenAI-compatible server accepts."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_image(image: Image.Image, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> str:
    """A JPEG data URL of the image, its longer side cut to `max_side`: bounded request size and cost.

    Deterministic for the same pixels, so the same image always makes the same cache key.
    """
    if max_side < 1:
        raise FinerError("--max-image-side must be at least 1")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image_data_url(image)


def decode_data_url(url: str) -> Image.Image:
    """The image inside a base64 data URL (what a local model is given in place of a remote server)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError("not a base64 data URL")
    return open_image(data=base64.b64decode(payload))
