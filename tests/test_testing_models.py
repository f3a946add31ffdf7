"""The tiny offline VLMs: each family builds fast and seeded, loads through the Auto classes, renders the real
family's chat template (the one TRL recognises) and generates; every family of the registry has one."""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import trl
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from trl import chat_template_utils

import finer.testing.tiny_vlm as tiny_vlm
from finer.testing import (
    CHAT_TEMPLATES,
    NEEDS_TORCHVISION,
    TINY_FAMILIES,
    TINY_FOR_FAMILY,
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
# The registry moves from finer.train to finer.models; this test follows it.
_REGISTRY = "finer.models.families" if importlib.util.find_spec("finer.models") else "finer.train.families"
REGISTRY = importlib.import_module(_REGISTRY).FAMILIES
# Image tokens for one 32x32 tiny_image(): small, as promised. LLaVA-NeXT: 16 for the base view, 16 for its
# one tile plus 4 row newlines; Gemma 3: 16 patches average-pooled to 4.
IMAGE_TOKENS = {
    "llava": 16, "llava_next": 36, "qwen2_vl": 4, "qwen2_5_vl": 4, "qwen3_vl": 4, "idefics3": 4, "gemma3": 4,
}  # fmt: skip
GENERATION_PROMPT = {
    "llava": "ASSISTANT:",
    "llava_next": " [/INST]",  # its template has no generation prompt: the user turn's end is the prompt
    "qwen2_vl": "<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>assistant\n",
    "qwen3_vl": "<|im_start|>assistant\n",
    "idefics3": "Assistant:",
    "gemma3": "<start_of_turn>model\n",
}


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
    # image_token_ids, not image_token_id: Gemma 3's image_token_id is <start_of_image>, one per image
    return int(torch.isin(input_ids, torch.tensor(processor.image_token_ids)).sum())


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
    assert CHAT_TEMPLATES["qwen2_5_vl"] == chat_template_utils.qwen2_5_vl_chat_template
    assert CHAT_TEMPLATES["qwen3_vl"] == chat_template_utils.qwen3_vl_chat_template
    assert CHAT_TEMPLATES["llava_next"] == chat_template_utils.llava_next_chat_template
    assert CHAT_TEMPLATES["gemma3"] == chat_template_utils.gemma3_chat_template
    assert CHAT_TEMPLATES["idefics3"] == chat_template_utils.smolvlm_chat_template
    # llava-hf's LLaVA-1.5 template has no TRL entry because it is marked already.
    assert chat_template_utils.has_generation_markers(CHAT_TEMPLATES["llava"])


@pytest.mark.parametrize("family", FAMILIES)
def test_trl_picks_the_real_familys_training_template(family: str) -> None:
    expected = {
        "llava": None,  # used as is
        "llava_next": chat_template_utils.llava_next_training_chat_template,
        "qwen2_vl": chat_template_utils.qwen2_5_vl_training_chat_template,
        "qwen2_5_vl": chat_template_utils.qwen2_5_vl_training_chat_template,
        "qwen3_vl": chat_template_utils.qwen3_vl_training_chat_template,
        "idefics3": chat_template_utils.smolvlm_training_chat_template,
        "gemma3": chat_template_utils.gemma3_training_chat_template,
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


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_without_torchvision_exactly_the_qwen_families_say_why(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_vlm, "is_torchvision_available", lambda: False)
    registry_name = next(f for f, t in TINY_FOR_FAMILY.items() if t == family)
    if family.startswith("qwen"):
        assert family in NEEDS_TORCHVISION
        assert "torchvision" in (unavailable_reason(family) or "")
        assert unavailable_reason(registry_name) == unavailable_reason(family)
        with pytest.raises(ImportError, match="torchvision"):
            build_tiny_vlm(family, tmp_path)
    else:
        assert unavailable_reason(family) is None and unavailable_reason(registry_name) is None


def test_every_registry_family_has_a_tiny_model() -> None:
    """A family added to the registry without a tiny model (or one of another architecture) fails here."""
    assert {f.name for f in REGISTRY} == set(TINY_FOR_FAMILY)
    assert sorted(TINY_FOR_FAMILY.values()) == sorted(TINY_FAMILIES)
    for family in REGISTRY:
        tiny = TINY_FOR_FAMILY[family.name]
        if reason := unavailable_reason(tiny):
            pytest.fail(f"{family.name}: {reason}")
        config = json.loads((tiny_vlm_path(family.name) / "config.json").read_text())
        assert config["model_type"] in family.model_types, family.name
        assert tiny_vlm_path(family.name) == tiny_vlm_path(tiny)


@pytest.mark.parametrize("family", REGISTRY, ids=lambda f: f.name)
def test_trl_swaps_in_the_template_the_registry_names(family: Any) -> None:
    """The registry's `template` for a TRL family is the training template TRL picks for the real model's
    template, which the tiny model carries; for a template of ours the tiny model has none of TRL's."""
    processor = _load(TINY_FOR_FAMILY[family.name])[0]
    swapped = chat_template_utils.get_training_chat_template(processor)
    if family.template.startswith("finer:"):
        assert swapped is None  # LLaVA-1.5 renders its own marked template
        return
    trl_file = Path(trl.__file__).parent / "chat_templates" / family.template
    assert swapped == trl_file.read_text(encoding="utf-8")


def test_llava_next_tiles_a_wide_image_over_its_tiny_pinpoints() -> None:
    processor, model = _load("llava_next")
    assert model.config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32]]
    wide = tiny_image(0, size=64).crop((0, 0, 64, 32))
    inputs = processor(images=[wide], text=["<image>\nWhat is it?"], return_tensors="pt")
    # base view 16 + two 4x4 tiles side by side (4 rows of 8) + 4 row newlines
    assert _image_tokens(processor, inputs["input_ids"]) == 16 + 4 * 8 + 4
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_qwen3_vl_deepstack_taps_existing_vision_layers() -> None:
    _, model = _load("qwen3_vl")
    vision = model.config.vision_config
    assert vision.deepstack_visual_indexes and max(vision.deepstack_visual_indexes) < vision.depth
    assert len(model.model.visual.deepstack_merger_list) == len(vision.deepstack_visual_indexes)
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True


def test_gemma3_image_tokens_match_the_pooled_tower_and_stop_at_end_of_turn() -> None:
    processor, model = _load("gemma3")
    config = model.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert processor.image_seq_length == config.mm_tokens_per_image == patches // 4
    tokenizer = processor.tokenizer
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert config.boi_token_index == tokenizer.convert_tokens_to_ids("<start_of_image>")
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id
    inputs = processor.apply_chat_template(
        [_question()], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["input_ids"][0].tolist().count(tokenizer.bos_token_id) == 1  # the template renders it


def test_registry_names_and_tiny_names_are_interchangeable() -> None:
    assert tiny_vlm_path("llava-1.5") == tiny_vlm_path("llava")
    with pytest.raises(ValueError, match="qwen2.5-vl"):
        tiny_vlm_path("blip-2")


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


def _readme_family_table() -> list[dict[str, str]]:
    """The README's family table as rows keyed by column header (other columns may join it)."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| family | tiny model |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def test_readme_family_table_matches_the_registry_and_the_tiny_models() -> None:
    rows = {row["family"]: row for row in _readme_family_table()}
    assert list(rows) == [f.name for f in REGISTRY]
    for family in REGISTRY:
        row = rows[family.name]
        assert row["tiny model"].startswith(f"`{TINY_FOR_FAMILY[family.name]}`"), row
        if family.template.startswith("finer:"):
            expected = f"finer's `{family.template.removeprefix('finer:')}`"
        else:
            expected = f"TRL's `{family.template}`"
        assert row["chat template trained"] == expected, row


def test_readme_family_table_ticks_exactly_what_test_families_runs_for_every_family() -> None:
    """Each ✓ column names a test of tests/test_families.py parametrised over the whole registry."""
    import test_families

    rows = _readme_family_table()
    ticked = set(rows[0]) - {"family", "tiny model", "chat template trained"}
    assert ticked == set(test_families.COLUMNS)
    for column, names in test_families.COLUMNS.items():
        for name in names:
            marks = getattr(test_families, name).pytestmark
            (families,) = [m.args[1] for m in marks if m.name == "parametrize" and m.args[0] == "entry"]
            assert list(families) == list(REGISTRY), name
        assert [row[column] for row in rows] == ["✓"] * len(REGISTRY), column
