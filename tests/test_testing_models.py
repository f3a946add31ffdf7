"""The tiny offline VLMs: each family builds fast and seeded, loads through the Auto classes, renders the real
family's chat template (the one TRL recognises) and generates."""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin
from trl import chat_template_utils

from finer.testing import (
    CHAT_TEMPLATES,
    TINY_FAMILIES,
    build_tiny_vlm,
    qwen2_vl_parts,
    tiny_image,
    tiny_vlm_path,
    unavailable_reason,
)

FAMILIES = [
    pytest.param(
        family,
        marks=pytest.mark.skipif(
            unavailable_reason(family) is not None, reason=unavailable_reason(family) or ""
        ),
    )
    for family in TINY_FAMILIES
]
IMAGE_TOKENS = {"llava": 16, "qwen2_vl": 4, "idefics3": 4}  # for one tiny_image(): small, as promised
GENERATION_PROMPT = {"llava": "ASSISTANT:", "qwen2_vl": "<|im_start|>assistant\n", "idefics3": "Assistant:"}


@cache
def _load(family: str) -> tuple[ProcessorMixin, PreTrainedModel]:
    path = tiny_vlm_path(family)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    return processor, model.eval()


def _question(text: str = "What bird is this?", seed: int = 0) -> dict[str, object]:
    return {
        "role": "user",
        "content": [{"type": "image", "image": tiny_image(seed)}, {"type": "text", "text": text}],
    }


def _image_tokens(processor: ProcessorMixin, input_ids: torch.Tensor) -> int:
    return int((input_ids == processor.image_token_id).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_and_generates(family: str) -> None:
    processor, model = _load(family)
    inputs = processor.apply_chat_template(
        [_question()], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert _image_tokens(processor, inputs["input_ids"]) == IMAGE_TOKENS[family]

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 8
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


@pytest.mark.parametrize("family", FAMILIES)
def test_images_may_also_come_as_processor_kwargs(family: str) -> None:
    processor, _ = _load(family)
    placeholder = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What bird is this?"}],
    }
    common = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    in_content = processor.apply_chat_template([_question()], **common)
    as_kwargs = processor.apply_chat_template(
        [placeholder], processor_kwargs={"images": [tiny_image(0)]}, **common
    )
    assert torch.equal(in_content["input_ids"], as_kwargs["input_ids"])
    assert torch.equal(in_content["pixel_values"], as_kwargs["pixel_values"])


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_a_multi_turn_conversation(family: str) -> None:
    processor, model = _load(family)
    conversation = [
        _question(),
        {"role": "assistant", "content": [{"type": "text", "text": "A Laysan Albatross."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which attributes can you see?"}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    positions = [
        text.index(s) for s in ("What bird is this?", "A Laysan Albatross.", "Which attributes can you see?")
    ]
    assert positions == sorted(positions)
    assert text.endswith(GENERATION_PROMPT[family])

    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert _image_tokens(processor, inputs["input_ids"]) == IMAGE_TOKENS[family]
    assert "A Laysan Albatross." in processor.decode(inputs["input_ids"][0], skip_special_tokens=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_holds_safetensors_and_the_family_template(family: str) -> None:
    path = tiny_vlm_path(family)
    assert list(path.glob("*.safetensors"))
    assert not list(path.glob("*.bin"))
    assert _load(family)[0].chat_template == CHAT_TEMPLATES[family]


def test_templates_are_the_published_ones_trl_knows() -> None:
    # TRL compares templates by exact equality: Qwen2-VL ships Qwen2.5-VL's template, SmolVLM its own.
    assert CHAT_TEMPLATES["qwen2_vl"] == chat_template_utils.qwen2_5_vl_chat_template
    assert CHAT_TEMPLATES["idefics3"] == chat_template_utils.smolvlm_chat_template
    # llava-hf's LLaVA-1.5 template has no TRL entry because it is marked already.
    assert chat_template_utils.has_generation_markers(CHAT_TEMPLATES["llava"])


@pytest.mark.parametrize("family", FAMILIES)
def test_trl_picks_the_real_familys_training_template(family: str) -> None:
    expected = {
        "llava": None,  # used as is
        "qwen2_vl": chat_template_utils.qwen2_5_vl_training_chat_template,
        "idefics3": chat_template_utils.smolvlm_training_chat_template,
    }[family]
    assert chat_template_utils.get_training_chat_template(_load(family)[0]) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_fast_seeded_and_leaves_the_global_rng_alone(family: str, tmp_path: Path) -> None:
    reference = load_file(tiny_vlm_path(family) / "model.safetensors")  # also warms the imports
    torch.manual_seed(1234)
    expected_draw = torch.rand(3)
    torch.manual_seed(1234)

    start = time.perf_counter()
    same = build_tiny_vlm(family, tmp_path / "seed0")
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"{family} took {elapsed:.1f}s to build"  # about 0.5 s here; generous against noise
    assert torch.equal(torch.rand(3), expected_draw)

    other = build_tiny_vlm(family, tmp_path / "seed1", seed=1)
    same_weights = load_file(same / "model.safetensors")
    other_weights = load_file(other / "model.safetensors")
    assert all(torch.equal(reference[name], same_weights[name]) for name in reference)
    assert any(not torch.equal(reference[name], other_weights[name]) for name in reference)
    assert (same / "tokenizer.json").read_bytes() == (tiny_vlm_path(family) / "tokenizer.json").read_bytes()


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llava"):
        build_tiny_vlm("blip", tmp_path)


@pytest.mark.skipif(unavailable_reason("qwen2_vl") is None, reason="torchvision is installed")
def test_qwen2_vl_without_torchvision_says_why(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="torchvision"):
        build_tiny_vlm("qwen2_vl", tmp_path)


def test_qwen2_vl_generates_from_its_parts_without_the_processor(tmp_path: Path) -> None:
    """Qwen2-VL's model, tokenizer and image processor need no torchvision: build, save, reload and generate
    from an image, expanding the image pad token by hand as `Qwen2VLProcessor` does (merge 2x2)."""
    model, tokenizer, image_processor = qwen2_vl_parts()
    model.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"

    pixels = image_processor(images=[tiny_image()], return_tensors="pt")
    image_tokens = int(pixels["image_grid_thw"][0].prod()) // 4
    assert image_tokens == IMAGE_TOKENS["qwen2_vl"]
    text = tokenizer.apply_chat_template(
        [_question()], chat_template=CHAT_TEMPLATES["qwen2_vl"], add_generation_prompt=True, tokenize=False
    )
    assert text.count("<|image_pad|>") == 1 and text.endswith(GENERATION_PROMPT["qwen2_vl"])
    inputs = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, **pixels, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 8
    assert isinstance(tokenizer.decode(new_tokens, skip_special_tokens=True), str)


def test_tiny_image_is_small_rgb_and_seeded() -> None:
    image = tiny_image(3)
    assert (image.mode, image.size) == ("RGB", (32, 32))
    assert image.tobytes() == tiny_image(3).tobytes() != tiny_image(4).tobytes()
    assert tiny_image(0, size=48).size == (48, 48)
