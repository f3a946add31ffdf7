"""Tiny random-weight *parts* of a VLM, for `finer compose` tests: vision encoders and causal LMs.

Each builder writes a folder laid out like the real Hub checkpoint it stands for, so composing from it takes
the production path:

- `clip`: a whole `CLIPModel` (text and vision towers, as openai/clip-vit-* ship) and its image processor;
  compose must load the vision half only.
- `siglip`: a whole `SiglipModel` (google/siglip-*), no CLS token, a fixed-size image processor.
- `dinov2`: a `Dinov2Model` (facebook/dinov2-*) with DINOv2's resize-then-crop image processor.
- `llama`: a `LlamaForCausalLM` with a BOS-adding tokenizer that pads with `<unk>` (lmsys/vicuna-*).
- `qwen2`: a `Qwen2ForCausalLM` with tied embeddings, no BOS, `<|im_end|>` as EOS (Qwen/Qwen2.5-*-Instruct).

`build_tiny_clip` writes a whole contrastive encoder as the Hub ships openai/clip-vit-*: `CLIPModel`, its
tokenizer (`<|startoftext|> … <|endoftext|>`, padded with `<|endoftext|>`) and image processor, for the
choice-distractor mining (`finer.eval.distractors`), which embeds class names and images with it.

Sizes are `finer.testing.tiny_vlm`'s, and so is the tokenizer trainer: 32x32 images in 8-pixel patches
(16 patches), a 64-wide two-layer language model. Each builds in about a second on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)
from transformers.image_processing_utils import BaseImageProcessor

from finer.testing.tiny_vlm import _IMAGE_SIZE, _PATCH, _VISION, _cache_dir, _text_config, _train_tokenizer

__all__ = [
    "TINY_LLMS",
    "TINY_VISION",
    "build_tiny_clip",
    "build_tiny_llm",
    "build_tiny_vision",
    "tiny_clip_path",
    "tiny_part_path",
]

TINY_VISION: tuple[str, ...] = ("clip", "siglip", "dinov2")
TINY_LLMS: tuple[str, ...] = ("llama", "qwen2")

_TOWER = {**_VISION, "image_size": _IMAGE_SIZE, "patch_size": _PATCH}
# The text halves of CLIP and SigLIP, only there to be left behind by compose.
_CONTRASTIVE_TEXT = {
    **_VISION,
    "vocab_size": 64,
    "max_position_embeddings": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_SQUARE = {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
#: Text positions of the whole tiny CLIP: room for "a photo of a {fine}, a type of {coarse}" in our BPE.
_CLIP_TEXT_POSITIONS = 64


def _clip() -> tuple[PreTrainedModel, BaseImageProcessor]:
    config = CLIPConfig(
        text_config=_CONTRASTIVE_TEXT, vision_config=_TOWER, projection_dim=_VISION["hidden_size"]
    )
    processor = CLIPImageProcessorPil(size={"shortest_edge": _IMAGE_SIZE}, crop_size=_SQUARE)
    return CLIPModel(config), processor


def _clip_tokenizer() -> PreTrainedTokenizerFast:
    """CLIP's layout on our byte-level BPE: start and end token around every text, padded with the end
    token (CLIP pools the text at the first end token)."""
    start, end = "<|startoftext|>", "<|endoftext|>"
    tokenizer = _train_tokenizer([start, end], bos=start, eos=end, pad=end, unk=end, add_bos=False)
    ids = [(start, tokenizer.convert_tokens_to_ids(start)), (end, tokenizer.convert_tokens_to_ids(end))]
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{start} $A {end}", pair=f"{start} $A {end} $B {end}", special_tokens=ids
            ),
        ]
    )
    tokenizer.model_max_length = _CLIP_TEXT_POSITIONS
    return tokenizer


def _whole_clip() -> tuple[PreTrainedModel, PreTrainedTokenizerFast, BaseImageProcessor]:
    tokenizer = _clip_tokenizer()
    text = {
        **_CONTRASTIVE_TEXT,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": _CLIP_TEXT_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(text_config=text, vision_config=_TOWER, projection_dim=_VISION["hidden_size"])
    processor = CLIPImageProcessorPil(size={"shortest_edge": _IMAGE_SIZE}, crop_size=_SQUARE)
    return CLIPModel(config), tokenizer, processor


def _siglip() -> tuple[PreTrainedModel, BaseImageProcessor]:
    config = SiglipConfig(text_config=_CONTRASTIVE_TEXT, vision_config=_TOWER)
    return SiglipModel(config), SiglipImageProcessorPil(size=_SQUARE)


def _dinov2() -> tuple[PreTrainedModel, BaseImageProcessor]:
    config = Dinov2Config(
        hidden_size=_VISION["hidden_size"],
        num_hidden_layers=_VISION["num_hidden_layers"],
        num_attention_heads=_VISION["num_attention_heads"],
        mlp_ratio=_VISION["intermediate_size"] // _VISION["hidden_size"],
        image_size=_IMAGE_SIZE,
        patch_size=_PATCH,
    )
    # DINOv2 resizes the short side past the crop (256 -> 224); here 40 -> 32.
    processor = BitImageProcessorPil(size={"shortest_edge": _IMAGE_SIZE + _PATCH}, crop_size=_SQUARE)
    return Dinov2Model(config), processor


def _llama() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = _train_tokenizer(
        ["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad="<unk>", unk="<unk>", add_bos=True
    )
    return LlamaForCausalLM(LlamaConfig(**_text_config(tokenizer))), tokenizer


def _qwen2() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = _train_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk="<|endoftext|>",
        add_bos=False,
    )
    config = Qwen2Config(**_text_config(tokenizer), tie_word_embeddings=True)
    return Qwen2ForCausalLM(config), tokenizer


_VISION_BUILDERS: dict[str, Callable[[], tuple[PreTrainedModel, BaseImageProcessor]]] = {
    "clip": _clip,
    "siglip": _siglip,
    "dinov2": _dinov2,
}
_LLM_BUILDERS: dict[str, Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerFast]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
}


def _build(builders: dict, kind: str, out_dir: Path, seed: int) -> tuple[PreTrainedModel, object]:
    if kind not in builders:
        raise ValueError(f"unknown tiny part {kind!r}; choose one of {', '.join(builders)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, preprocessor = builders[kind]()
    model.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    return model, preprocessor


def build_tiny_vision(kind: str, out_dir: Path, *, seed: int = 0) -> Path:
    """A random-weight vision encoder checkpoint of `kind` (one of `TINY_VISION`) in `out_dir`."""
    _build(_VISION_BUILDERS, kind, Path(out_dir), seed)
    return Path(out_dir)


def build_tiny_llm(kind: str, out_dir: Path, *, seed: int = 0) -> Path:
    """A random-weight causal LM of `kind` (one of `TINY_LLMS`) with its tokenizer in `out_dir`."""
    model, tokenizer = _build(_LLM_BUILDERS, kind, Path(out_dir), seed)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_clip(out_dir: Path, *, seed: int = 0) -> Path:
    """A random-weight `CLIPModel` with its tokenizer and image processor in `out_dir` (openai/clip-vit-*'s
    layout: `AutoModel`, `AutoTokenizer` and `AutoImageProcessor` load it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tokenizer, processor = _whole_clip()
    for part in (model, tokenizer, processor):
        part.save_pretrained(out_dir)
    return Path(out_dir)


@cache
def tiny_clip_path() -> Path:
    """The folder of the whole tiny CLIP (seed 0), built once per process; read-only, deleted at exit."""
    return build_tiny_clip(_cache_dir() / "clip-whole")


@cache
def tiny_part_path(kind: str) -> Path:
    """The folder of tiny part `kind` (a vision encoder or an LLM, seed 0), built once per process.

    Treat it as read-only: every caller gets the same folder. It is deleted when the process exits.
    """
    build = build_tiny_vision if kind in _VISION_BUILDERS else build_tiny_llm
    return build(kind, _cache_dir() / f"part-{kind}")
