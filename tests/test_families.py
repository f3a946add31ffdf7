"""Every registered VLM family through everything a user does with it, on its tiny model (`finer.testing`):
finetune (both formats), the adapter by path and from the Hub cache, merge, eval (batched and not, the
`finer` replay), GRPO, grounding and the VLM extractor on a local model, and the part policies on real runs.

Parametrised over the registry (`finer.models.families.FAMILIES`), so a family added without a tiny model
fails here. Each (family, run) is trained once per process and shared by the checks (module fixtures).
`COLUMNS` names the test behind each column of the README's family table (tests/test_testing_models.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from test_adapters import _publish_to_cache
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationMixin

import finer
from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.eval.scoring import extract_answer
from finer.models.backends import HFBackend
from finer.models.families import FAMILIES, Family, part_of
from finer.prompts import render
from finer.testing import TINY_FOR_FAMILY, tiny_image, tiny_vlm_path
from finer.testing.fake_mediawiki import FakeMediaWiki, FakePage
from finer.train import sft

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

FAMILY = pytest.mark.parametrize("entry", FAMILIES, ids=lambda f: f.name)
#: README family-table column -> the tests here that back its ✓ for every family.
COLUMNS: dict[str, tuple[str, ...]] = {
    "finetune direct": (
        "test_finetune_trains_and_saves_an_adapter",
        "test_train_vision_lora_reaches_only_the_vision_tower",
    ),
    "finetune finer": ("test_finetune_trains_and_saves_an_adapter",),
    "eval": (
        "test_eval_batched_and_unbatched_greedy_answers_agree",
        "test_eval_finer_mode_replays_the_training_conversation",
    ),
    "grpo": ("test_grpo_runs_two_steps",),
    "ground hf": ("test_ground_and_vlm_extractor_prompt_one_image_with_one_bos",),
    "merge": ("test_merge_generates_the_same_and_lm_lora_leaves_vision_and_projector",),
    "adapter from Hub": ("test_adapter_by_path_and_from_the_hub_cache_generates_the_same",),
}
#: The runs trained per family: arguments of `finer finetune` beyond model, data and budget.
TRAININGS: dict[str, list[str]] = {
    "direct": ["--format", "direct"],  # --train-llm lora, the rest frozen: the defaults
    "finer": ["--format", "finer"],
    "vision": ["--format", "direct", "--train-llm", "frozen", "--train-vision", "lora"],
}
NEW_TOKENS = 6
REPO_ID = "someone/tiny-finer-lora"


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code or 0


@dataclass(frozen=True)
class Probe:
    """The last-position logits and greedy answer of a model to the direct fine question on one image."""

    logits: torch.Tensor
    text: str


def _probe(model: Any, processor: Any) -> Probe:
    image = tiny_image(3)
    messages = [
        {**m, "content": [{**b, "image": image} if b["type"] == "image" else b for b in m["content"]]}
        for m in render("direct", level="fine")
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1].float()
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    return Probe(logits, processor.batch_decode(new, skip_special_tokens=True)[0])


def _assert_same(probe: Probe, reference: Probe, atol: float = 1e-5) -> None:
    assert torch.allclose(probe.logits, reference.logits, atol=atol), (
        (probe.logits - reference.logits).abs().max()
    )
    assert probe.text == reference.text


@dataclass(frozen=True)
class Run:
    """One `finer finetune` run of a family's tiny model, with the trained model's probe before saving."""

    family: Family
    base: Path
    out: Path
    before_saving: Probe


def _tiny(entry: Family) -> Path:
    assert entry.name in TINY_FOR_FAMILY, f"registry family {entry.name} has no tiny model in finer.testing"
    return tiny_vlm_path(TINY_FOR_FAMILY[entry.name])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo source, one image per species and split: 8 train conversations, 8 test images."""
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, limit_per_class=1))
    return out


def _train(entry: Family, kind: str, demo: Path, out: Path) -> Run:
    """`finer finetune` from the command line; the trained model is probed as the adapter is saved."""
    seen: list[Probe] = []
    build_trainer = sft.build_trainer

    def probing(config: sft.FinetuneConfig) -> sft.Prepared:
        prepared = build_trainer(config)
        trainer, save = prepared.trainer, prepared.trainer.save_model

        def probe_then_save(*args: Any, **kwargs: Any) -> None:
            if not kwargs.get("_internal_call"):  # the adapter, not a checkpoint
                seen.append(_probe(trainer.model.eval(), trainer.processing_class))
            save(*args, **kwargs)

        trainer.save_model = probe_then_save
        return prepared

    base = _tiny(entry)
    argv = ["finetune", "--model", str(base), "--dataset", str(demo), "--output-dir", str(out),
            "--max-steps", "3", "--batch-size", "8", "--learning-rate", "1e-2", "--lora-r", "4",
            "--lora-alpha", "8", "--set", "report_to=none", "--set", "lr_scheduler=constant",
            *TRAININGS[kind]]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft, "build_trainer", probing)
        assert _cli(argv) == 0
    (before_saving,) = seen
    return Run(entry, base, out, before_saving)


@pytest.fixture(scope="module")
def runs(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family, str], Run]:
    """`runs(family, kind)`: the family trained as `TRAININGS[kind]` says, once per module."""
    made: dict[tuple[str, str], Run] = {}

    def get(entry: Family, kind: str) -> Run:
        if (entry.name, kind) not in made:
            made[entry.name, kind] = _train(entry, kind, demo, tmp_path_factory.mktemp(kind) / "run")
        return made[entry.name, kind]

    return get


@pytest.fixture(scope="module")
def merged(
    runs: Callable[[Family, str], Run], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Family, str], Path]:
    """`merged(family, kind)`: that run's adapter merged into its base by `finer merge`, once per module."""
    made: dict[tuple[str, str], Path] = {}

    def get(entry: Family, kind: str) -> Path:
        if (entry.name, kind) not in made:
            out = tmp_path_factory.mktemp("merged") / kind
            assert _cli(["merge", "--adapter", str(runs(entry, kind).out), "--out", str(out)]) == 0
            made[entry.name, kind] = out
        return made[entry.name, kind]

    return get


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).state_dict()


def _changed_parts(base: Path, other: Path, entry: Family) -> set[str]:
    """The parts (vision, projector, llm, other) with a weight that differs between two models."""
    before, after = _weights(base), _weights(other)
    assert before.keys() == after.keys()
    return {part_of(k, entry) or "other" for k in before if not torch.equal(before[k], after[k])}


# --- finetune, adapters, merge ------------------------------------------------------------------------


@FAMILY
@pytest.mark.parametrize("kind", ["direct", "finer"])
def test_finetune_trains_and_saves_an_adapter(entry: Family, kind: str, runs: Callable) -> None:
    run = runs(entry, kind)
    summary = json.loads((run.out / sft.RUN_FILE).read_text())
    assert summary["family"] == entry.name and summary["config"]["format"] == kind
    assert summary["global_step"] == 3 and all(math.isfinite(loss) for loss in summary["losses"])
    assert (run.out / "adapter_model.safetensors").is_file() and (run.out / "processor_config.json").is_file()


@FAMILY
def test_adapter_by_path_and_from_the_hub_cache_generates_the_same(
    entry: Family, runs: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = runs(entry, "direct")
    model, processor = finer.load_adapter(str(run.out), device="cpu", dtype="float32")
    _assert_same(_probe(model, processor), run.before_saving)
    plain = AutoModelForImageTextToText.from_pretrained(run.base, dtype=torch.float32).eval()
    assert not torch.allclose(_probe(plain, processor).logits, run.before_saving.logits, atol=1e-4), (
        "the trained adapter should change the model"
    )
    cache = tmp_path / "hub"
    _publish_to_cache(run.out, cache, REPO_ID)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model, processor = finer.load_adapter(REPO_ID, device="cpu", dtype="float32")
    _assert_same(_probe(model, processor), run.before_saving)


@FAMILY
def test_merge_generates_the_same_and_lm_lora_leaves_vision_and_projector(
    entry: Family, runs: Callable, merged: Callable
) -> None:
    """`--train-llm lora` (the default): merged, only language-model weights differ from the base."""
    run, out = runs(entry, "direct"), merged(entry, "direct")
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    _assert_same(_probe(model, AutoProcessor.from_pretrained(out)), run.before_saving, atol=1e-4)
    assert _changed_parts(run.base, out, entry) == {"llm"}


@FAMILY
def test_train_vision_lora_reaches_only_the_vision_tower(
    entry: Family, runs: Callable, merged: Callable
) -> None:
    """`--train-llm frozen --train-vision lora`: merged, only vision-tower weights differ (projector not)."""
    assert _changed_parts(runs(entry, "vision").base, merged(entry, "vision"), entry) == {"vision"}


# --- prompts the model receives ---------------------------------------------------------------------


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Every batch a model is asked to continue (transformers' `generate`), as it was tokenized."""
    seen: list[dict[str, torch.Tensor]] = []
    generate = GenerationMixin.generate

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask", "pixel_values")})
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    return seen


def _assert_one_bos(prompts: list[dict[str, torch.Tensor]], base: Path) -> None:
    """Each prompt (padding aside) starts with the BOS token and holds no second one; a tokenizer without
    BOS (Qwen) adds no special token at all."""
    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    bos = tokenizer.bos_token_id
    assert prompts
    if bos is None:
        assert tokenizer("a bird").input_ids == tokenizer("a bird", add_special_tokens=False).input_ids
    for prompt in prompts:
        for ids, mask in zip(prompt["input_ids"], prompt["attention_mask"], strict=True):
            tokens = ids[mask.bool()].tolist()
            assert tokens.count(bos) == (0 if bos is None else 1) and (bos is None or tokens[0] == bos)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# --- eval ----------------------------------------------------------------------------------------------


@FAMILY
def test_eval_batched_and_unbatched_greedy_answers_agree(
    entry: Family, runs: Callable, demo: Path, tmp_path: Path, prompts: list
) -> None:
    """`finer eval --backend hf` of the trained adapter, attribute seeking (two turns), batch 1 and 4."""
    run = runs(entry, "direct")
    answers = []
    for batch_size in (1, 4):
        out = tmp_path / str(batch_size)
        argv = ["eval", "--dataset", str(demo), "--out", str(out), "--model", str(run.base), "--adapter",
                str(run.out), "--backend", "hf", "--mode", "attrseek", "--limit", "4", "--batch-size",
                str(batch_size), "--max-new-tokens", str(NEW_TOKENS)]  # fmt: skip
        assert _cli(argv) == 0
        answers.append({r["key"]: (r["attributes"], r["prediction"]) for r in _records(out)})
    assert len(answers[0]) == 12 and answers[0] == answers[1]
    batched = [p for p in prompts if len(p["input_ids"]) > 1]
    assert batched and any((p["attention_mask"][:, 0] == 0).any() for p in batched), "no left padding"
    assert all((p["attention_mask"][:, -1] == 1).all() for p in batched)
    _assert_one_bos(prompts, run.base)


@FAMILY
def test_eval_finer_mode_replays_the_training_conversation(
    entry: Family, runs: Callable, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--mode finer` with the finer-format adapter: at the fine level, three turns, the model's own two
    answers between the training template's three questions about the group it named."""
    asked: list[list[dict]] = []
    generate = HFBackend.generate

    def recording(self: HFBackend, conversations: list, images: list) -> Any:
        asked.extend(conversations)
        return generate(self, conversations, images)

    monkeypatch.setattr(HFBackend, "generate", recording)
    run = runs(entry, "finer")
    out = tmp_path / "finer"
    argv = ["eval", "--dataset", str(demo), "--out", str(out), "--model", str(run.base), "--adapter",
            str(run.out), "--backend", "hf", "--mode", "finer", "--limit", "2", "--batch-size", "2",
            "--max-new-tokens", str(NEW_TOKENS)]  # fmt: skip
    assert _cli(argv) == 0
    fine = [r for r in _records(out) if r["level"] == "fine"]
    assert len(fine) == 2
    for record in fine:
        said = record["turns"]
        # the conversation that answered: the model's own two answers between three questions
        third = next(c for c in asked if len(c) == 5 and [m["content"][0]["text"] for m in c[1::2]] == said)
        group = extract_answer(said[0]) or record["superordinate"]
        training = render(
            "train_finer", superordinate=record["superordinate"], coarse=group, fine="", attributes=[]
        )
        assert [m["role"] for m in training] == ["user", "assistant"] * 3
        assert third[::2] == training[::2]
        assert third[:1] in asked and third[:3] in asked  # the turns before, each asked of the model


# --- GRPO ----------------------------------------------------------------------------------------------


@FAMILY
def test_grpo_runs_two_steps(entry: Family, demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    argv = ["grpo", "--model", str(_tiny(entry)), "--dataset", str(demo), "--output-dir", str(out),
            "--num-generations", "2", "--batch-size", "2", "--max-steps", "2", "--max-completion-length", "4",
            "--lora-r", "4", "--lora-alpha", "8", "--report-to", "none",
            "--set", "logging_steps=1"]  # fmt: skip
    assert _cli(argv) == 0
    summary = json.loads((out / "finer_run.json").read_text())
    assert summary["trainer"] == "grpo" and summary["global_step"] == 2
    assert len(summary["losses"]) == 2 and all(math.isfinite(loss) for loss in summary["losses"])
    assert (out / "adapter_model.safetensors").is_file()


# --- grounding and the VLM extractor on a local model -------------------------------------------------


@pytest.fixture
def one_bird(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An image folder of one species, one image per split, and a Wikipedia mirror with its page."""
    root = tmp_path / "birds"
    for split in ("train", "test"):
        (root / split / "Cerulean_Warbler").mkdir(parents=True)
        tiny_image(5).save(root / split / "Cerulean_Warbler" / "0.png")
    page = FakePage.article("The Cerulean Warbler is a small songbird.", {"Description": "A blue back."})
    with FakeMediaWiki({"Cerulean Warbler": page}) as wiki:
        yield root, wiki.url


@FAMILY
def test_ground_and_vlm_extractor_prompt_one_image_with_one_bos(
    entry: Family,
    demo: Path,
    one_bird: tuple[Path, str],
    tmp_path: Path,
    prompts: list,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`finer ground --backend hf` and `finer build --extractor vlm --backend hf`, one image each."""
    base = _tiny(entry)
    argv = ["ground", str(demo), "--out", str(tmp_path / "g"), "--model", str(base), "--backend", "hf",
            "--splits", "test", "--limit", "1", "--concurrency", "1"]  # fmt: skip
    code = _cli(argv)
    # A random model never closes its JSON within the token limit: the reply is cut, so never kept.
    assert code == 2 and "every request failed, e.g. reply cut off" in capsys.readouterr().err
    assert prompts and all(len(p["input_ids"]) == 1 and "pixel_values" in p for p in prompts)
    _assert_one_bos(prompts, base)

    prompts.clear()
    root, wiki = one_bird
    out = tmp_path / "b"
    argv = ["build", "imagefolder", "--root", str(root), "--out", str(out), "--knowledge", "--extractor",
            "vlm", "--backend", "hf", "--model", str(base), "--wiki-api", wiki, "--exemplars", "1",
            "--concurrency", "1", "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert _cli(argv) == 0
    attributes = json.loads((out / "build.json").read_text())["knowledge"]["attributes"]
    assert attributes["extractor"] == f"vlm:{base}"
    assert attributes["exemplars"]["images"] == {"Cerulean_Warbler": ["train/Cerulean_Warbler/0.png"]}
    assert prompts and all(len(p["input_ids"]) == 1 and "pixel_values" in p for p in prompts)
    _assert_one_bos(prompts, base)
