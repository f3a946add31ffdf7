"""The tokens a chat request will cost, counted before it is sent (`--dry-run`, `--max-cost`, `--tpm`).

Text: `tiktoken`'s encoding for OpenAI models (`tiktoken.encoding_name_for_model`), built from the rank file
the `bpe-openai` package ships (byte-identical to the one tiktoken downloads: the tests check tiktoken's
own sha256), so counting needs no network; an encoding bpe-openai lacks is loaded by tiktoken itself
(downloaded once). Any other model is *estimated* at one token per 4 characters, OpenAI's rule of thumb
for English, and the count says it is one. Each message adds 3 tokens of chat framing and the reply 3 more
(OpenAI's published accounting for the gpt-4o family).

Images: OpenAI's published tile rule, on the image sizes actually sent (read from the data URLs).
`detail: low` costs the base tokens; `high` (and `auto`, which finer sends: counted as high, the upper
bound) scales the image to fit 2048 x 2048, then its shorter side down to 768, and costs the base plus
a per-tile price for each 512-px tile. Base and tile prices per model family as OpenAI
lists them; other models (patch-priced minis, any non-OpenAI model) are counted by the gpt-4o rule and
marked as an estimate.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from PIL import Image

__all__ = ["CHARS_PER_TOKEN", "TokenCount", "count_request", "encoding", "image_tokens", "text_counter"]

CHARS_PER_TOKEN = 4
MESSAGE_TOKENS = 3
REPLY_TOKENS = 3
#: (base, per 512-px tile) image tokens by model family, from OpenAI's vision pricing page.
TILE_TOKENS: dict[str, tuple[int, int]] = {
    "gpt-4o-mini": (2833, 5667),
    "gpt-4o": (85, 170),
    "gpt-4.1": (85, 170),
    "gpt-4.5": (85, 170),
    "gpt-5": (70, 140),
    "o1": (75, 150),
    "o3": (75, 150),
}
_DEFAULT_TILES = TILE_TOKENS["gpt-4o"]
#: Base64 characters of a data URL decoded first to read an image's size (3 KB: the headers of the JPEGs
#: finer sends, and of PNG, GIF and WebP files, end well before).
_HEADER_CHARS = 4096
#: Families OpenAI prices by 32-px patches instead; counted by the default tile rule, as an estimate.
_PATCH_PRICED = ("gpt-4.1-mini", "gpt-4.1-nano", "gpt-5-mini", "gpt-5-nano", "o4-mini")
_LOADING = threading.Lock()


@dataclass
class TokenCount:
    """Input tokens of one request: text (framing included) and images, and whether each is exact."""

    text: int = 0
    images: int = 0
    text_exact: bool = False
    images_exact: bool = True

    @property
    def total(self) -> int:
        return self.text + self.images


def _tile_tokens(model: str) -> tuple[tuple[int, int], bool]:
    """The model's (base, tile) image tokens and whether the tile rule is its published rule."""
    name = model.rpartition("/")[2]
    if name.startswith(_PATCH_PRICED):
        return _DEFAULT_TILES, False
    for family in sorted(TILE_TOKENS, key=len, reverse=True):  # gpt-4o-mini before gpt-4o
        if name.startswith(family):
            return TILE_TOKENS[family], True
    return _DEFAULT_TILES, False


def image_tokens(width: int, height: int, detail: str = "high", model: str = "gpt-4o") -> int:
    """Input tokens of one image of this size by OpenAI's tile rule."""
    (base, tile), _ = _tile_tokens(model)
    if detail == "low":
        return base
    if max(width, height) > 2048:
        scale = 2048 / max(width, height)
        width, height = int(width * scale), int(height * scale)
    if min(width, height) > 768:
        scale = 768 / min(width, height)
        width, height = int(width * scale), int(height * scale)
    return base + tile * math.ceil(width / 512) * math.ceil(height / 512)


def image_size(url: str) -> tuple[int, int] | None:
    """Width and height of a data-URL image (only its header is decoded); None for a remote URL.

    The first `_HEADER_CHARS` of the base64 payload usually hold the header; when they do not (a long
    EXIF or ICC block), the whole payload is decoded. Every request with an image is counted here, before
    it is sent, so decoding a 700 KB payload each time would cost milliseconds per call.
    """
    if not url.startswith("data:") or "," not in url:
        return None
    payload = url.partition(",")[2]
    for part in (payload[:_HEADER_CHARS], payload) if len(payload) > _HEADER_CHARS else (payload,):
        try:
            with Image.open(io.BytesIO(base64.b64decode(part, validate=False))) as image:
                return image.size
        except (binascii.Error, OSError, ValueError):
            continue
    return None


@cache
def encoding(name: str) -> Any:
    """tiktoken's encoding `name` (e.g. "o200k_base"), from bpe-openai's copy of its rank file when there
    is one, else as tiktoken loads it (which may download it); None when neither can."""
    import tiktoken

    try:
        # bpe-openai reads its files (on import too) through a deprecated importlib call; the lock keeps
        # two threads' catch_warnings from restoring each other's filters
        with _LOADING, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from bpe_openai import registry

            spec = getattr(registry, name, None)
            return tiktoken.Encoding(**spec()) if callable(spec) else tiktoken.get_encoding(name)
    except Exception:  # an encoding bpe-openai lacks, and tiktoken cannot download it here
        return None


@cache
def text_counter(model: str) -> tuple[Callable[[str], int], bool]:
    """A function counting `model`'s text tokens, and whether it is the model's own tokenizer."""
    import tiktoken

    try:
        name = tiktoken.encoding_name_for_model(model.rpartition("/")[2])
    except KeyError:  # not an OpenAI model
        name = None
    tokenizer = encoding(name) if name else None
    if tokenizer is None:
        return (lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)), False
    return (lambda text: len(tokenizer.encode(text, disallowed_special=()))), True


def count_request(model: str, messages: Sequence[dict[str, Any]]) -> TokenCount:
    """Input tokens of a chat request in the wire shape (`openai_messages`), counted as OpenAI bills them."""
    count, exact = text_counter(model)
    _, tiles_known = _tile_tokens(model)
    tokens = TokenCount(text=REPLY_TOKENS, text_exact=exact)
    for message in messages:
        tokens.text += MESSAGE_TOKENS + count(str(message.get("role", "")))
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for block in blocks:
            if block.get("type") == "text":
                tokens.text += count(block.get("text", ""))
            elif block.get("type") == "image_url":
                image = block.get("image_url") or {}
                size = image_size(image.get("url", ""))
                if size is None:  # a remote image: its size is unknown here
                    tokens.images_exact = False
                    size = (512, 512)
                tokens.images += image_tokens(*size, detail=image.get("detail", "auto"), model=model)
                tokens.images_exact &= tiles_known
    return tokens
