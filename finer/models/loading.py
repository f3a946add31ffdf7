"""Loading a VLM for inference, with or without a PEFT adapter trained by `finer finetune`, and merging.

`load_model(model, adapter)` is what every local-inference step uses (evaluation, grounding, probes): the
best device and dtype, eval mode, and an adapter refused up front when it was trained on another base.
`load_adapter(repo_id_or_path)` reads the base model from the adapter's `adapter_config.json`, loads the base
model and the processor (the adapter's own when it was saved with one, else the base's), applies the adapter
and checks that its LoRA weights really loaded: a LoRA B matrix left all zero means the saved keys did not
match the model's modules (an adapter saved by a newer transformers with other module names, say), which
would otherwise silently give the base model's answers. A repo id resolves through the Hugging Face cache
(`HF_HUB_OFFLINE=1` works once it is there).

`merge_adapter` folds the adapter into the base weights (`merge_and_unload`) and saves a plain model with its
processor, loadable by `AutoModelForImageTextToText` and servable by vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finer.errors import FinerError, one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

__all__ = [
    "adapter_base",
    "adapter_dir",
    "check_adapter_base",
    "check_lora_loaded",
    "load_adapter",
    "load_model",
    "merge_adapter",
    "pick_device",
]

ADAPTER_CONFIG = "adapter_config.json"
#: Any of these in the adapter folder means the processor was saved with it.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def adapter_dir(repo_id_or_path: str | Path) -> Path:
    """The local folder of an adapter: the path itself, or the Hub repo's snapshot (cache first)."""
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        if not (path / ADAPTER_CONFIG).is_file():
            raise FinerError(f"adapter {repo_id_or_path}: no {ADAPTER_CONFIG} in that folder")
        return path
    name = str(repo_id_or_path)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FinerError(f"adapter {name}: neither an adapter folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, repo_type="model"))
    except Exception as err:  # offline without a cached copy, no such repo, no access: one line
        raise FinerError(
            f"adapter {name}: cannot fetch it from the Hub or the cache ({one_line(err)})"
        ) from None
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FinerError(f"adapter {name}: the repo has no {ADAPTER_CONFIG}; is it a PEFT adapter?")
    return folder


def _adapter_config(folder: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FinerError(f"adapter {name}: unreadable {ADAPTER_CONFIG} ({one_line(err)})") from None


def adapter_base(repo_id_or_path: str | Path) -> str:
    """The base model an adapter was trained on (`base_model_name_or_path` of its config)."""
    folder = adapter_dir(repo_id_or_path)
    base = _adapter_config(folder, str(repo_id_or_path)).get("base_model_name_or_path")
    if not base:
        raise FinerError(
            f"adapter {repo_id_or_path}: its {ADAPTER_CONFIG} names no base model; pass --model explicitly"
        )
    return str(base)


def check_lora_loaded(model: torch.nn.Module, name: str, folder: Path | None = None) -> int:
    """Raise unless the adapter's trained LoRA weights are in `model`; returns how many B matrices it has.

    All B matrices zero means nothing loaded (or nothing was trained). With the adapter's `folder`, every B
    matrix saved non-zero must also be non-zero in the model: one saved zero is legitimate (a layer that got
    no gradient, such as the vision layer after the one LLaVA reads its features from).
    """
    import torch

    checked = 0
    zero: list[str] = []
    for module_name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        for adapter_name, layer in lora_b.items():
            checked += 1
            if not bool(torch.count_nonzero(layer.weight)):
                zero.append(f"{module_name}.lora_B.{adapter_name}")
    trained = _saved_nonzero_lora_b(folder) if folder is not None else None
    if zero and (len(zero) == checked or (trained is not None and checked - len(zero) < trained)):
        raise FinerError(
            f"adapter {name}: {len(zero)} of {checked} LoRA B matrices are all zero after loading (first: "
            f"{zero[0]}); its weights did not load (saved with other module names or another transformers "
            "version?) or it was never trained"
        )
    return checked


def _saved_nonzero_lora_b(folder: Path) -> int | None:
    """How many LoRA B matrices the adapter file holds non-zero (None without a safetensors file)."""
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as tensors:
        keys = [key for key in tensors.keys() if ".lora_B." in key]  # noqa: SIM118 - not iterable
        return sum(bool(tensors.get_tensor(key).count_nonzero()) for key in keys)


def pick_device() -> tuple[str, str]:
    """(device, dtype name): a GPU in bf16 (fp16 where bf16 is missing), else the CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "cpu", "float32"


def _identity(name: str) -> str:
    """A model reference that two spellings of the same local folder share."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _config_without_names(name: str) -> dict[str, Any] | None:
    """A model's architecture config (local folder or cached Hub id), or None when it cannot be read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError):
        return None
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    return config


def check_adapter_base(model: str, adapter: str) -> None:
    """Refuse an adapter trained on another base model than ``model`` (one line, before any loading).

    Equal when the names are, when both name the same folder, or when both configs can be read and agree
    (a local copy of a Hub model).
    """
    from peft import PeftConfig

    try:
        base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    except (OSError, ValueError) as err:
        raise FinerError(f"--adapter {adapter}: not a PEFT adapter ({one_line(err)})") from None
    if not base or _identity(base) == _identity(model):
        return
    base_config = _config_without_names(base)
    if base_config is not None and base_config == _config_without_names(model):
        return
    raise FinerError(
        f"--adapter {adapter} was trained on {base}, not on --model {model}; pass --model {base}"
    )


def load_model(model: str, adapter: str | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model (with its PEFT adapter, if any) on the best device, in eval mode, and its processor.

    With an adapter, `finer.load_adapter` does the loading (and checks the LoRA weights really loaded).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if adapter:
        from finer.models.loading import load_adapter

        check_adapter_base(model, adapter)
        return load_adapter(adapter, base_model=model)
    device, dtype = pick_device()
    try:
        processor = AutoProcessor.from_pretrained(model)
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, device_map=device)
    except (OSError, ValueError) as err:
        raise FinerError(f"--model {model}: cannot load a vision-language model ({one_line(err)})") from None
    loaded.eval()
    return loaded, processor


def load_adapter(
    repo_id_or_path: str | Path,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    base_model: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The base model with the adapter applied (eval mode) and the processor.

    ``base_model`` overrides the base named in the adapter's config (a local copy of it, say). ``device`` and
    ``dtype`` default to the best available: a GPU in bf16, else the CPU in fp32 (``dtype="auto"``: the
    checkpoint's own).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = str(repo_id_or_path)
    folder = adapter_dir(repo_id_or_path)
    base = base_model or adapter_base(folder)
    if device is None or dtype is None:
        best_device, best_dtype = pick_device()
        device = device or best_device
        dtype = dtype or best_dtype
    has_processor = any((folder / file).is_file() for file in _PROCESSOR_FILES)
    try:
        processor = AutoProcessor.from_pretrained(str(folder) if has_processor else base)
    except (OSError, ValueError) as err:
        where = f"adapter {name}" if has_processor else f"base model {base}"
        raise FinerError(f"{where}: cannot load the processor ({one_line(err)})") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, device_map=device)
    except (OSError, ValueError) as err:
        raise FinerError(
            f"adapter {name}: cannot load its base model {base} ({one_line(err)}); pass the base with --model"
        ) from None
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise FinerError(f"adapter {name}: cannot apply it to {base} ({one_line(err)})") from None
    check_lora_loaded(model, name, folder)
    model.eval()
    return model, processor


def merge_adapter(
    repo_id_or_path: str | Path, out: str | Path, *, dtype: str = "auto", base_model: str | None = None
) -> Path:
    """Merge the adapter into its base (`merge_and_unload`) and save model (safetensors) and processor."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FinerError(f"--out {out} is not empty; choose a new folder")
    model, processor = load_adapter(repo_id_or_path, device="cpu", dtype=dtype, base_model=base_model)
    merged = model.merge_and_unload()
    # The merged model is a plain transformers model: its config must not point back at the adapter.
    merged.config._name_or_path = str(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
