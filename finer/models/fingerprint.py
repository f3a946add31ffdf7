"""What a model or adapter *is*, not where it lives: a short content fingerprint for run identities.

`finer eval` keys its answers by the model and adapter it asked; a path alone would let a retrained adapter
saved at the same place be answered from the old one's predictions. The fingerprint reads the folder's
top-level files (weights, configs, tokenizer, chat template; not checkpoint sub-folders): small files in
full, a large safetensors file by its header and the first, middle and last bytes of every tensor, any other
large file by its size and evenly spaced samples. So a base model of many GB costs a few thousand small
reads, while any retraining, merge or swap (which changes every trained tensor) changes the fingerprint.
A Hub id is the commit its cached snapshot resolves to. Modification times are never read, so a copy of the
same files has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from finer.errors import FinerError, one_line

__all__ = ["FULL_HASH_BYTES", "files_fingerprint", "weights_fingerprint"]

#: Files up to this size are hashed whole.
FULL_HASH_BYTES = 32 << 20
#: Bytes read at each sampled place of a large file.
_SAMPLE = 4096
#: Sampled places in a large file that is not safetensors.
_SAMPLES = 64
_DIGITS = 16


def _sample(fh: object, start: int, end: int, hasher: hashlib._Hash) -> None:
    """Hash the first, middle and last `_SAMPLE` bytes of ``[start, end)`` (all of it when short)."""
    size = end - start
    places = [start] if size <= 3 * _SAMPLE else [start, start + (size - _SAMPLE) // 2, end - _SAMPLE]
    for place in places:
        fh.seek(place)  # type: ignore[attr-defined]
        hasher.update(fh.read(min(_SAMPLE, size)))  # type: ignore[attr-defined]


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    size = path.stat().st_size
    hasher.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                hasher.update(block)
            return hasher.hexdigest()
        if path.suffix == ".safetensors":
            (length,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(length)
            hasher.update(header)
            for name, entry in sorted(json.loads(header).items()):
                if name != "__metadata__":
                    first, last = entry["data_offsets"]
                    _sample(fh, 8 + length + first, 8 + length + last, hasher)
            return hasher.hexdigest()
        for index in range(_SAMPLES):
            fh.seek(index * (size - _SAMPLE) // (_SAMPLES - 1))
            hasher.update(fh.read(_SAMPLE))
    return hasher.hexdigest()


def files_fingerprint(paths: list[Path]) -> str:
    """The content fingerprint of files by name and content (in name order), e.g. a built split's Arrow
    files: the same rows written by two builds, or copied elsewhere, have the same fingerprint."""
    hasher = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        hasher.update(f"{path.name}\0{_file_digest(path)}\0".encode())
    return hasher.hexdigest()[:_DIGITS]


def _folder_fingerprint(folder: Path) -> str:
    return files_fingerprint([p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")])


def _hub_commit(repo_id: str) -> str | None:
    """The commit a Hub model id resolves to (the cached snapshot when there is one), None when unknown."""
    from huggingface_hub import snapshot_download

    try:  # no download: only what the cache (or, online, the Hub's refs) says
        return Path(snapshot_download(repo_id, repo_type="model", local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached; the Hub's own answer follows
        pass
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        return None
    try:
        return HfApi().model_info(repo_id).sha
    except Exception:  # noqa: BLE001 - no such repo or no access: loading says so in one line
        return None


def weights_fingerprint(name_or_path: str | None) -> str | None:
    """The content fingerprint of a local model or adapter folder, or ``hub:<commit>`` of a Hub id.

    None for no model; ``hub:unresolved`` when a Hub id's commit cannot be known (not cached, offline):
    loading it will then fail with its own one-line error. A folder that cannot be read is a `FinerError`.
    """
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        try:
            return _folder_fingerprint(path)
        except (OSError, ValueError, struct.error) as err:
            raise FinerError(f"cannot read {name_or_path} to fingerprint it ({one_line(err)})") from None
    return f"hub:{_hub_commit(str(name_or_path)) or 'unresolved'}"
