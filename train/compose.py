"""`finer compose`: a LLaVA-style VLM from any CLIP / SigLIP / DINOv2 vision encoder and any causal LM.

The "eyes vs brain" study (docs/design.md §1, Ghosh et al.) swaps the vision encoder and the language model
of one
architecture. transformers' LLaVA classes already are that architecture: a vision tower read at one hidden
layer, a new two-layer GELU projector (`LlavaMultiModalProjector`), any `AutoModel` language model. So a
composed model is a plain `LlavaForConditionalGeneration` checkpoint with a `LlavaProcessor`: it loads with
the Auto classes, and `finer finetune` trains it as the llava family.

What depends on the encoder is its token layout: CLIP and DINOv2 prepend a CLS token, which LLaVA's
"default" strategy drops; SigLIP has none, so every token is kept ("full"). The processor must expand
`<image>` to exactly as many tokens as the tower yields; `compose` checks that on a blank image before it
writes anything. Only the encoder's vision weights are loaded (a CLIP checkpoint's text tower is left behind,
and SigLIP's pooling head, which LLaVA never reads, is not built). The language model keeps its weights;
the tokenizer gains the `<image>` token (embeddings grow, never shrink: Qwen pads its vocabulary) and the
chat template is LLaVA-1.5's marked training template, the one the registry trains the llava family with.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from finer.errors import FinerError, one_line
from finer.records import COMPOSE_FILE, ComposeRecord
from finer.run_folder import staged_output

from .config import SourcedConfig

__all__ = ["COMPOSE_FILE", "ENCODERS", "ComposeConfig", "Encoder", "compose"]

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Encoder:
    """A vision encoder family: the config `model_type`s of its checkpoints (a whole contrastive model, or
    the vision half alone), the transformers class holding the vision weights, and its token layout."""

    name: str
    model_types: tuple[str, ...]
    loader: str
    strategy: Literal["default", "full"]
    extra_tokens: int  # tokens before the patches: 1 for a CLS token


ENCODERS: tuple[Encoder, ...] = (
    Encoder("clip", ("clip", "clip_vision_model"), "CLIPVisionModel", "default", 1),
    Encoder("siglip", ("siglip", "siglip_vision_model"), "SiglipVisionModel", "full", 0),
    Encoder("dinov2", ("dinov2",), "Dinov2Model", "default", 1),
)


@dataclass
class ComposeConfig(SourcedConfig):
    """One composition. `dtype` "auto" is the language model's checkpoint dtype (the tower is cast to it);
    `vision_feature_layer` -2 is LLaVA's penultimate layer; `seed` initialises the projector."""

    vision: str
    llm: str
    out: str
    overwrite: bool = False
    vision_feature_layer: int = -2
    dtype: str = "auto"
    image_token: str = "<image>"
    seed: int = 0


def _encoder(model_type: str, spec: str) -> Encoder:
    for encoder in ENCODERS:
        if model_type in encoder.model_types:
            return encoder
    known = ", ".join(f"{e.name} ({'/'.join(e.model_types)})" for e in ENCODERS)
    raise FinerError(
        f"--vision {spec}: model_type {model_type!r} is not a supported encoder (known: {known})"
    )


def _replaceable(out: Path) -> None:
    """`--overwrite` replaces a model, never a folder of something else."""
    if not (out / "config.json").is_file():
        raise FinerError(f"--out {out} holds files that are not a model; choose another folder")


def _quiet_transformers() -> Any:
    """Silence transformers' load reports (a CLIP checkpoint's text weights are meant to be left out)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    return level


def _vision_config(spec: str, feature_layer: int) -> tuple[Any, Encoder]:
    """The vision half's config and encoder family of `spec`, checked before any weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise FinerError(f"--vision {spec}: cannot read its config ({one_line(err)})") from None
    encoder = _encoder(config.model_type, spec)
    vision_config = getattr(config, "vision_config", None) or config
    layers = vision_config.num_hidden_layers
    if not -layers - 1 <= feature_layer <= layers:
        raise FinerError(
            f"--vision-feature-layer {feature_layer}: the tower has {layers} layers "
            f"(hidden states {-layers - 1} to {layers})"
        )
    if encoder.name == "siglip":
        vision_config.vision_use_head = False  # the pooling head: LLaVA reads hidden states, never its output
    return vision_config, encoder


def _load_vision(spec: str, vision_config: Any, encoder: Encoder, dtype: Any) -> tuple[Any, Any]:
    """(vision tower, image processor) of `spec`: the vision weights only."""
    import transformers
    from transformers import AutoImageProcessor

    level = _quiet_transformers()
    try:
        tower = getattr(transformers, encoder.loader).from_pretrained(spec, config=vision_config, dtype=dtype)
        image_processor = AutoImageProcessor.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise FinerError(f"--vision {spec}: cannot load it ({one_line(err)})") from None
    finally:
        transformers.utils.logging.set_verbosity(level)
    return tower, image_processor


def _load_llm(spec: str, dtype: str) -> tuple[Any, Any]:
    """(causal LM, tokenizer) of `spec`, in `dtype` ("auto": the checkpoint's own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        lm = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
        )
    except (OSError, ValueError) as err:
        raise FinerError(f"--llm {spec}: cannot load a causal language model ({one_line(err)})") from None
    return lm, tokenizer


def _add_image_token(tokenizer: Any, token: str) -> int:
    """The id of `token`, added as a special token when the vocabulary lacks it; gives a pad token too."""
    from tokenizers import AddedToken

    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:  # Llama / Vicuna ship none; TRL's collator and batched generation pad
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(token)


def _chat_template() -> str:
    """LLaVA-1.5's marked training template, as the family registry names it."""
    from finer.models.families import OURS, detect_family

    file = detect_family("llava").template.removeprefix(OURS)
    folder = importlib.resources.files("finer.prompt_templates") / "chat_templates"
    return (folder / file).read_text(encoding="utf-8")


def _assemble(config: Any, tower: Any, lm: Any, seed: int) -> Any:
    """A LlavaForConditionalGeneration holding the loaded tower and LM and a freshly initialised projector.

    The skeleton is built on the meta device, so a 7B language model is never allocated twice.
    """
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = type(model.model.language_model)
    if not isinstance(lm.base_model, expected):
        raise FinerError(
            f"--llm: its decoder is a {type(lm.base_model).__name__}, where LLaVA builds a "
            f"{expected.__name__} from the same config; this language model cannot be composed"
        )
    model.model.vision_tower = tower
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(config)
    model.model.multi_modal_projector = projector.to(lm.dtype)
    return model


def _image_token_check(model: Any, processor: Any, image_token_id: int) -> tuple[int, list[int]]:
    """(image tokens per image, processed image size); raises unless the tower yields exactly that many."""
    import torch
    from PIL import Image

    blank = Image.new("RGB", (64, 64), (127, 127, 127))
    inputs = processor(text=processor.image_token, images=[blank], return_tensors="pt")
    expected = int((inputs["input_ids"] == image_token_id).sum())
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"].to(model.dtype)).pooler_output
    produced = features[0].shape[0]
    if produced != expected:
        raise FinerError(
            f"the processor writes {expected} image tokens but the vision tower yields {produced}; "
            "this encoder's token layout is not supported"
        )
    return expected, list(inputs["pixel_values"].shape[-2:])


def compose(config: ComposeConfig) -> ComposeRecord:
    """Compose, check and save model and processor into `config.out` (atomically); returns what it writes
    beside them (`COMPOSE_FILE`: what the model was composed from, and how)."""
    if config.dtype not in DTYPES:
        raise FinerError(f"--dtype {config.dtype}: choose one of {', '.join(DTYPES)}")
    with staged_output(config.out, overwrite=config.overwrite, check=_replaceable) as staged:
        summary = _compose(config, staged.out, staged.partial)
    return summary


def _compose(config: ComposeConfig, out: Path, partial: Path) -> ComposeRecord:
    """`compose`'s body: model, processor and compose.json saved into `partial`."""
    from transformers import LlavaConfig, LlavaProcessor

    vision_config, encoder = _vision_config(config.vision, config.vision_feature_layer)
    lm, tokenizer = _load_llm(config.llm, config.dtype)
    tower, image_processor = _load_vision(config.vision, vision_config, encoder, lm.dtype)
    image_token_id = _add_image_token(tokenizer, config.image_token)
    llava_config = LlavaConfig(
        vision_config=tower.config,
        text_config=lm.config,
        image_token_index=image_token_id,
        vision_feature_select_strategy=encoder.strategy,
        vision_feature_layer=config.vision_feature_layer,
    )
    model = _assemble(llava_config, tower, lm, config.seed)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config = lm.generation_config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=encoder.strategy,
        num_additional_image_tokens=encoder.extra_tokens,
        chat_template=_chat_template(),
        image_token=config.image_token,
    )
    model.eval()
    image_tokens, image_size = _image_token_check(model, processor, image_token_id)
    model.config.image_seq_length = image_tokens
    summary: ComposeRecord = {
        **asdict(config),
        "out": str(out),
        "encoder": encoder.name,
        "vision_feature_select_strategy": encoder.strategy,
        "image_tokens": image_tokens,
        "image_size": image_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": {
            "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
            "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
            "llm": sum(p.numel() for p in model.model.language_model.parameters()),
        },
        "versions": {p: importlib.metadata.version(p) for p in ("finer", "torch", "transformers")},
    }
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    (partial / COMPOSE_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "composed %s (%s, %s) + %s: %d image tokens of %dx%d pixels",
        config.vision,
        encoder.name,
        encoder.strategy,
        config.llm,
        image_tokens,
        *image_size,
    )
    return summary
