"""`finer grpo`: the verifiable rewards on scripted completions (exact values), the GRPO rows, and GRPO
steps on the tiny offline LLaVA with LoRA on the language model only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.records import RunRecord
from finer.testing import tiny_vlm_path, unavailable_reason
from finer.train import rewards
from finer.train.grpo import GrpoConfig, grpo_dataset, run_grpo
from finer.train.rewards import (
    accuracy_reward,
    attribute_grounding_reward,
    combined_reward,
    completion_text,
    format_reward,
    parse_reward_weights,
)
from tests.records_check import declared

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

OWL = {
    "superordinate": "Bird",
    "coarse": ["Owl", "Strigidae"],
    "fine": ["Great Horned Owl", "Bubo virginianus"],
}
ATTRIBUTES = ["ear tufts", "yellow eyes", "barred chest"]


def _open(completions: list, level: str = "fine", **extra: list) -> dict:
    n = len(completions)
    columns = {key: [value] * n for key, value in OWL.items()}
    return {"prompts": [None] * n, "completions": completions, "level": [level] * n, **columns, **extra}


def _choice(completions: list, gold: str = "B", k: int = 3) -> dict:
    n = len(completions)
    options = [f"option {i}" for i in range(k)]
    return {
        "prompts": [None] * n,
        "completions": completions,
        "gold_letter": [gold] * n,
        "options": [options] * n,
    }


# --- accuracy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "level", "expected"),
    [
        ("Answer: Great Horned Owl", "fine", 1.0),
        ("It has ear tufts. Answer: a great-horned owl.", "fine", 1.0),  # joiners, article, case
        ("Answer: Bubo virginianus", "fine", 1.0),  # any accepted label
        ("Answer: an owl", "fine", 0.0),  # too general at the fine level
        ("Answer: an owl", "coarse", 1.0),
        ("Answer: Great Horned Owl", "superordinate", 1.0),  # hierarchical credit
        ("Answer: Great Horned Owl", "coarse", 1.0),
        ("Answer: Horned Owls", "coarse", 0.0),  # whole words: "Owls" is not "Owl"
        ("Great Horned Owl", "fine", 1.0),  # no marker: the whole text is the answer
        ("Answer: Great Horned Owl. Answer: Snowy Owl", "fine", 0.0),  # the last marker wins
        ("", "fine", 0.0),
        ("Answer:", "superordinate", 0.0),
        ("Answer: bird", "superordinate", 1.0),
        ("Answer: " + "word " * 20 + "Great Horned Owl", "fine", 0.0),  # past the first 20 words
    ],
)
def test_accuracy_open(completion: str, level: str, expected: float) -> None:
    assert accuracy_reward(**_open([completion], level)) == [expected]


def test_accuracy_reads_conversational_completions() -> None:
    completions = [
        [{"role": "assistant", "content": "Answer: Great Horned Owl"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "Answer: Bubo virginianus"}]}],
        [{"role": "assistant", "content": [{"type": "text", "text": "Answer: Snowy Owl"}]}],
    ]
    assert accuracy_reward(**_open(completions)) == [1.0, 1.0, 0.0]
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
        )
        == "a"
    )


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Answer: (B)", 1.0),
        ("Answer: B", 1.0),
        ("Answer: b.", 1.0),
        ("The answer is B", 1.0),
        ("Answer: (A)", 0.0),
        ("Answer: A or B", 0.0),  # a hedge never earns credit
        ("Answer: D", 0.0),  # outside the 3 options
        ("Answer: a bird", 0.0),  # the article, not option A
        ("Answer: (A) hmm. Answer: (B)", 1.0),  # the last marker wins
    ],
)
def test_accuracy_choice(completion: str, expected: float) -> None:
    assert accuracy_reward(**_choice([completion])) == [expected]


def test_accuracy_mixes_choice_and_open_rows() -> None:
    batch = _open(
        ["Answer: (B)", "Answer: Great Horned Owl"], gold_letter=["B", ""], options=[["x", "y"], []]
    )
    assert accuracy_reward(**batch) == [1.0, 1.0]


def test_accuracy_names_a_missing_column() -> None:
    with pytest.raises(FinerError, match="'level'"):
        accuracy_reward(
            prompts=[None], completions=["Answer: Owl"], superordinate=["Bird"], coarse=[[]], fine=[[]]
        )


# --- format -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Answer: Great Horned Owl", 1.0),
        ("It has ear tufts and yellow eyes.\nanswer: owl", 1.0),  # any case
        ("Great Horned Owl", 0.0),  # no marker
        ("Answer:", 0.0),  # empty answer
        ("Answer:   \n", 0.0),
        ("Answer: Owl\nAnswer: Eagle", 0.0),  # two answers
        ("Answer: " + " ".join(["owl"] * 20), 1.0),  # 20 words: still one answer
        ("Answer: " + " ".join(["owl"] * 21), 0.0),  # a list of guesses
        (" ".join(["look"] * 254) + " Answer: owl", 1.0),  # 256 words in all
        (" ".join(["look"] * 255) + " Answer: owl", 0.0),  # runaway length
    ],
)
def test_format_open(completion: str, expected: float) -> None:
    assert format_reward(**_open([completion])) == [expected]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Answer: (C)", 1.0),
        ("Answer: (A)", 1.0),
        ("Answer: maybe", 0.0),
        ("Answer: A or B", 0.0),
        ("Answer: E", 0.0),
    ],
)
def test_format_choice_needs_one_option_letter(completion: str, expected: float) -> None:
    # Format does not look at the gold: a wrong but well-formed letter is well formed.
    assert format_reward(**_choice([completion])) == [expected]


def test_format_reads_conversational_completions() -> None:
    completions = [
        [{"role": "assistant", "content": "Answer: Owl"}],
        [{"role": "assistant", "content": "Owl"}],
    ]
    assert format_reward(**_open(completions)) == [1.0, 0.0]


# --- attribute grounding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "attributes", "expected"),
    [
        ("Ear tufts, yellow eyes and a barred chest. Answer: Great Horned Owl", ATTRIBUTES, 1.0),
        ("I see ear-tufts and YELLOW EYES. Answer: owl", ATTRIBUTES, 2 / 3),  # joiners and case
        ("It has tufts. Answer: owl", ATTRIBUTES, 0.0),  # part of an attribute is not naming it
        ("Answer: owl with ear tufts and yellow eyes", ATTRIBUTES, 0.0),  # after the answer: no credit
        ("ear tufts, yellow eyes, barred chest", ATTRIBUTES, 0.0),  # no answer marker
        ("Barred chest. Answer: owl. Yellow eyes. Answer: owl", ATTRIBUTES, 2 / 3),  # before the last marker
        ("Ear tufts. Answer: owl", ["ear tufts", "none"], 1.0),  # "none" is no attribute
        ("Ear tufts. Answer: owl", ["none"], 0.0),
        ("Ear tufts. Answer: owl", [], 0.0),
        ("Bewicks wren eyebrow. Answer: wren", ["Bewick's wren eyebrow", "long tail"], 0.5),
    ],
)
def test_attribute_grounding(completion: str, attributes: list[str], expected: float) -> None:
    got = attribute_grounding_reward(
        prompts=[None], completions=[completion], attributes_required=[attributes]
    )
    assert got == [pytest.approx(expected, abs=1e-12)]


def test_attribute_grounding_needs_the_column() -> None:
    with pytest.raises(FinerError, match="attributes_required"):
        attribute_grounding_reward(prompts=[None], completions=["Answer: owl"])


# --- combined ---------------------------------------------------------------------------------------


def test_combined_default_is_09_accuracy_01_format() -> None:
    reward = combined_reward()
    completions = ["Answer: Great Horned Owl", "Great Horned Owl", "Answer: Snowy Owl", "Snowy Owl"]
    got = reward(**_open(completions, attributes_required=[ATTRIBUTES] * 4))
    assert got == [pytest.approx(v, abs=1e-12) for v in (1.0, 0.9, 0.1, 0.0)]
    assert reward.__name__ == "combined_reward"


def test_combined_custom_weights_with_grounding() -> None:
    reward = combined_reward({"accuracy": 0.5, "format": 0.2, "grounding": 0.3})
    completions = [
        "Ear tufts and yellow eyes. Answer: Great Horned Owl",
        "Ear tufts. Answer: Snowy Owl",
        "owl",
    ]
    got = reward(**_open(completions, attributes_required=[ATTRIBUTES] * 3))
    assert got == [pytest.approx(v, abs=1e-12) for v in (0.5 + 0.2 + 0.3 * 2 / 3, 0.2 + 0.3 / 3, 0.0)]


def test_combined_choice() -> None:
    got = combined_reward()(**_choice(["Answer: (B)", "Answer: (C)", "B", "Answer: B or C"]))
    assert got == [pytest.approx(v, abs=1e-12) for v in (1.0, 0.1, 0.9, 0.0)]


def test_reward_weights_parsing() -> None:
    assert parse_reward_weights("accuracy=0.9,format=0.1") == {"accuracy": 0.9, "format": 0.1}
    assert parse_reward_weights(" accuracy=1 , grounding=0.25 ") == {"accuracy": 1.0, "grounding": 0.25}
    for bad, message in [
        ("accuracy", "NAME=NUMBER"),
        ("accuracy=high", "NAME=NUMBER"),
        ("speed=1", "unknown reward"),
        ("", "none given"),
        ("accuracy=0,format=0", "every reward weight is 0"),
    ]:
        with pytest.raises(FinerError, match=message):
            parse_reward_weights(bad)
    with pytest.raises(FinerError, match="unknown reward"):
        combined_reward({"acc": 1.0})


# --- data and training on the tiny LLaVA ------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, limit_per_class=1))
    return out


def test_grpo_rows(demo: Path) -> None:
    ds, samples = grpo_dataset([str(demo)], fmt="choice", level="fine", choices=3, seed=1)
    assert samples == {"demo": {"rows": 8, "kept": 8}}
    assert {"prompt", "image", "level", "gold_letter", "options", "fine", "attributes_required"} <= set(
        ds.column_names
    )
    for row in ds:
        assert len(row["options"]) == 3
        assert row["options"]["ABC".index(row["gold_letter"])] == row["fine"][0]
        (message,) = row["prompt"]
        assert message["role"] == "user" and message["content"][0]["type"] == "image"
        assert "(A)" in message["content"][1]["text"]
    again, _ = grpo_dataset([str(demo)], fmt="choice", level="fine", choices=3, seed=1)
    assert again["gold_letter"] == ds["gold_letter"]  # seeded per image
    ds, _ = grpo_dataset([str(demo)], fmt="open", level="coarse")
    assert set(ds["level"]) == {"coarse"} and set(ds["gold_letter"]) == {""}
    assert '"Answer:"' in ds[0]["prompt"][0]["content"][1]["text"]
    with pytest.raises(FinerError, match="unknown level"):
        grpo_dataset([str(demo)], fmt="open", level="all")


def _box_size(box: list[float]) -> tuple[int, int]:
    """The size of an image cropped to `box` (x, y, w, h), as `crop_box` rounds it."""
    x, y, w, h = box
    return round(x + w) - round(x), round(y + h) - round(y)


def test_grpo_rows_cropped_to_their_boxes_when_read(demo: Path) -> None:
    whole, _ = grpo_dataset([str(demo)], fmt="open", level="fine")
    cropped, samples = grpo_dataset([str(demo)], fmt="open", level="fine", crop=True)
    assert samples == {"demo": {"rows": 8, "kept": 8}} and "bbox" not in whole.column_names
    for row, original in zip(cropped, whole, strict=True):
        assert row["image"].size == _box_size(row["bbox"]) != original["image"].size
        assert row["prompt"] == original["prompt"] and row["fine"] == original["fine"]


def _varying(prompts: list, completions: list, **kwargs: object) -> list[float]:
    """Rewards that differ within each group, so that the advantages, and the gradient, are not zero."""
    return [float(i % 2) for i in range(len(completions))]


LLAVA_MISSING = unavailable_reason("llava")


@pytest.mark.skipif(LLAVA_MISSING is not None, reason=LLAVA_MISSING or "")
def test_grpo_steps_train_lm_lora_only(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rewards.REWARDS, "format", _varying)
    config = GrpoConfig(
        model=str(tiny_vlm_path("llava")),
        datasets=[str(demo)],
        output_dir=str(tmp_path / "out"),
        format="open",
        level="fine",
        reward_weights={"accuracy": 0.9, "format": 0.1, "grounding": 0.5},
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-3,
        max_steps=2,
        batch_size=2,
        num_generations=2,
        max_completion_length=8,
        logging_steps=1,
        report_to="none",
    )
    summary = run_grpo(config)
    assert summary["global_step"] == 2
    assert len(summary["losses"]) == 2 and all(math.isfinite(loss) for loss in summary["losses"])
    assert summary["reward_components"]["format"] == [0.5, 0.5]
    assert set(summary["reward_components"]) == {"accuracy", "format", "grounding"}
    assert summary["trainable_parameters"]["llm"]["trainable"] > 0
    assert (
        "vision" not in summary["trainable_parameters"]
        or not summary["trainable_parameters"]["vision"]["trainable"]
    )
    out = tmp_path / "out"
    assert json.loads((out / "finer_run.json").read_text())["trainer"] == "grpo"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all(".language_model." in k and ".lora_" in k for k in keys)
        assert any(f.get_tensor(k).abs().sum() > 0 for k in keys if ".lora_B." in k)  # it learned something


@pytest.mark.skipif(LLAVA_MISSING is not None, reason=LLAVA_MISSING or "")
def test_grpo_crop_to_bbox_shows_the_trainer_the_box(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images GRPOTrainer generates from (and hands the rewards) are the rows' boxes, not whole images."""
    seen: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def recording(prompts: list, completions: list, image: list, bbox: list, **kwargs: object) -> list[float]:
        seen.extend((picture.size, _box_size(box)) for picture, box in zip(image, bbox, strict=True))
        return _varying(prompts, completions)

    monkeypatch.setitem(rewards.REWARDS, "format", recording)
    config = GrpoConfig.from_sources(
        {
            "model": str(tiny_vlm_path("llava")),
            "datasets": [str(demo)],
            "output_dir": str(tmp_path / "out"),
            "crop_to_bbox": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "max_steps": 1,
            "batch_size": 2,
            "num_generations": 2,
            "max_completion_length": 4,
            "report_to": "none",
        }
    )
    summary = run_grpo(config)
    assert summary["global_step"] == 1 and summary["config"]["crop_to_bbox"] is True
    assert len(seen) == 2 and all(size == box for size, box in seen), seen
    assert all(size != (192, 192) for size, _ in seen)  # the demo's whole images


@pytest.mark.skipif(LLAVA_MISSING is not None, reason=LLAVA_MISSING or "")
def test_grpo_cli_choice(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["grpo", "--model", str(tiny_vlm_path("llava")), "--dataset", str(demo), "--output-dir", str(out)]
    args += [
        "--format",
        "choice",
        "--level",
        "fine",
        "--choices",
        "3",
        "--reward-weights",
        "accuracy=0.9,format=0.1",
    ]
    args += [
        "--num-generations",
        "2",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--max-completion-length",
        "4",
    ]
    args += ["--lora-r", "4", "--lora-alpha", "8", "--report-to", "none"]
    args += ["--crop-to-bbox", "--set", "beta=0.01"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    summary = json.loads((out / "finer_run.json").read_text())
    declared(summary, RunRecord)
    assert summary["config"]["format"] == "choice" and summary["samples"] == {"demo": {"rows": 8, "kept": 8}}
    assert summary["config"]["crop_to_bbox"] is True and summary["config"]["beta"] == 0.01
    assert summary["reward_weights"] == {"accuracy": 0.9, "format": 0.1}
    assert (out / "adapter_model.safetensors").is_file()


def test_grpo_rejects_bad_batch(demo: Path, tmp_path: Path) -> None:
    config = GrpoConfig(
        model="unused", datasets=[str(demo)], output_dir=str(tmp_path), batch_size=3, num_generations=2
    )
    with pytest.raises(FinerError, match="multiple of --num-generations"):
        run_grpo(config)
