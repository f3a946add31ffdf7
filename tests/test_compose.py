"""`finer compose` on tiny random encoders and LMs: Auto-class loading, image-token counts, generation,
what is loaded from where, atomic writes, and the caption (pretraining) format with its part policies."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel

from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.models.families import detect_family, trainable_by_part
from finer.records import ComposeRecord, read_compose_file
from finer.testing import tiny_image, tiny_part_path
from finer.train.compose import COMPOSE_FILE, ComposeConfig, compose
from finer.train.data import load_mixture
from finer.train.sft import FinetuneConfig, build_trainer, load_recipe
from tests.records_check import declared

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

PAIRS = [("clip", "llama"), ("siglip", "qwen2"), ("dinov2", "llama")]


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """One composed model per (vision, LLM) pair."""
    root = tmp_path_factory.mktemp("composed")
    models = {}
    for vision, llm in PAIRS:
        out = root / f"{vision}-{llm}"
        compose(ComposeConfig(vision=str(tiny_part_path(vision)), llm=str(tiny_part_path(llm)), out=str(out)))
        models[vision, llm] = out
    return models


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is not a dict


@pytest.mark.parametrize(("vision", "llm"), PAIRS, ids=lambda part: part)
def test_composed_model_loads_with_auto_classes_and_generates_from_an_image(
    vision: str, llm: str, composed: dict[tuple[str, str], Path]
) -> None:
    folder = composed[vision, llm]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert detect_family(model.config.model_type).name == "llava-1.5"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.py"))
    strategy = "full" if vision == "siglip" else "default"  # SigLIP has no CLS token to drop
    assert model.config.vision_feature_select_strategy == processor.vision_feature_select_strategy == strategy
    assert processor.num_additional_image_tokens == (0 if vision == "siglip" else 1)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert "{% generation %}" in processor.chat_template  # the registry's marked LLaVA-1.5 template

    messages = [{"role": "user", "content": [{"type": "image", "image": tiny_image(3)},
                                             {"type": "text", "text": "What bird is this?"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    assert image_tokens == features.shape[0] == model.config.image_seq_length == 16  # (32 / 8)^2 patches
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    summary = read_compose_file(folder)  # compose.json, as `finer.records` declares it
    declared(summary, ComposeRecord)
    assert summary["encoder"] == vision and summary["image_tokens"] == 16


def test_only_the_vision_half_is_loaded_and_the_language_model_keeps_its_weights(
    composed: dict[tuple[str, str], Path],
) -> None:
    assert not any("text" in key or "logit_scale" in key for key in _weights(composed["clip", "llama"]))
    model = AutoModelForImageTextToText.from_pretrained(composed["clip", "llama"])
    clip = CLIPVisionModel.from_pretrained(tiny_part_path("clip")).state_dict()
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == clip.keys() and all(torch.equal(tower[k], clip[k]) for k in clip)
    lm = AutoModel.from_pretrained(tiny_part_path("llama")).state_dict()
    layer = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.model.language_model.state_dict()[layer], lm[layer])
    assert not any(".head." in key for key in _weights(composed["siglip", "qwen2"]))  # LLaVA never reads it
    model = AutoModelForImageTextToText.from_pretrained(composed["siglip", "qwen2"])
    assert model.lm_head.weight is model.get_input_embeddings().weight  # Qwen's tied embeddings stay tied


def test_compose_writes_atomically_and_refuses_to_overwrite(tmp_path: Path) -> None:
    parts = {"vision": str(tiny_part_path("siglip")), "llm": str(tiny_part_path("llama"))}
    out = tmp_path / "model"
    assert compose(ComposeConfig(**parts, out=str(out))) == read_compose_file(out)
    with pytest.raises(FinerError, match="--overwrite"):
        compose(ComposeConfig(**parts, out=str(out)))
    compose(ComposeConfig(**parts, out=str(out), overwrite=True, vision_feature_layer=-1))
    assert json.loads((out / "config.json").read_text())["vision_feature_layer"] == -1
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(FinerError, match="not a model"):
        compose(ComposeConfig(**parts, out=str(notes), overwrite=True))
    with pytest.raises(FinerError, match="vision-feature-layer 5: the tower has 2 layers"):
        compose(ComposeConfig(**parts, out=str(tmp_path / "bad"), vision_feature_layer=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes"]  # no .partial left behind


def test_cli_composes_and_reports_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "clip-qwen2"
    args = ["compose", "--vision", str(tiny_part_path("clip")), "--llm", str(tiny_part_path("qwen2"))]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(out)])
    assert exit_info.value.code == 0
    assert "16 image tokens" in capsys.readouterr().out and (out / COMPOSE_FILE).is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["compose", "--vision", str(tiny_part_path("llama")), "--llm", str(tiny_part_path("qwen2")),
              "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "'llama' is not a supported encoder" in err and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo source, one image per species and split: 8 training images."""
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, limit_per_class=1))
    return out


def test_caption_format_uses_the_caption_column_else_the_labels(demo: Path, tmp_path: Path) -> None:
    rows = load_mixture([str(demo)], fmt="caption").dataset
    messages = rows[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    fine = datasets.load_from_disk(str(demo))["train"][0]["fine"][0]
    assert messages[1]["content"][0]["text"].startswith(f"a photo of a {fine}, a kind of ")
    captioned = tmp_path / "captioned"
    datasets.load_from_disk(str(demo)).map(lambda r: {"caption": f"A bird: {r['fine'][0]}."}).save_to_disk(
        str(captioned)
    )
    rows = load_mixture([str(captioned)], fmt="caption").dataset
    assert rows[0]["messages"][1]["content"][0]["text"] == f"A bird: {fine}."


@pytest.mark.parametrize("llm_policy", ["frozen", "full"])
def test_pretraining_trains_the_projector_and_only_the_parts_its_policy_names(
    llm_policy: str, demo: Path, composed: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    """The `pretrain` recipe: projector in full, vision frozen, the language model as the policy says."""
    settings = {
        "model": str(composed["clip", "llama"]),
        "datasets": [str(demo)],
        "output_dir": str(tmp_path / "run"),
        "train_llm": llm_policy,
        "report_to": "none",
    }
    prepared = build_trainer(FinetuneConfig.from_sources(load_recipe("pretrain"), settings))
    assert (
        prepared.trainer.train_dataset[0]["messages"][0]["content"][1]["text"]
        == "Describe this image briefly."
    )
    counts = trainable_by_part(prepared.trainer.model, prepared.family)
    trainable = {part: counts[part][0] for part in ("vision", "projector", "llm")}
    totals = {part: counts[part][1] for part in ("vision", "projector", "llm")}
    assert trainable["vision"] == 0 and trainable["projector"] == totals["projector"] > 0
    assert trainable["llm"] == (totals["llm"] if llm_policy == "full" else 0)


def test_overwrite_crashed_mid_swap_keeps_the_earlier_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed as the new model goes in, the earlier one is whole again for the next run (finer.run_folder)."""
    parts = {"vision": str(tiny_part_path("siglip")), "llm": str(tiny_part_path("llama"))}
    out = tmp_path / "model"
    compose(ComposeConfig(**parts, out=str(out)))
    before = (out / "config.json").read_text()
    rename = Path.rename

    def crash(self: Path, target: Path) -> Path:
        if self.name == ".model.partial":
            raise KeyboardInterrupt  # what SIGKILL would leave: nothing after this runs
        return rename(self, target)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Path, "rename", crash)
        compose(ComposeConfig(**parts, out=str(out), overwrite=True, vision_feature_layer=-1))
    with pytest.raises(FinerError, match="--overwrite"):
        compose(ComposeConfig(**parts, out=str(out)))
    assert (out / "config.json").read_text() == before
