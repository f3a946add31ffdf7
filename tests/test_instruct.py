"""General instruction data mixed into fine-tuning: LLaVA's JSON read safely, sampled at the ratio, every
conversation accounted for, and trained with the same assistant-only mask."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.testing import tiny_image, tiny_vlm_path
from finer.train.data import load_mixture
from finer.train.instruct import INSTRUCTION_SOURCE, mix_instructions
from finer.train.sft import FinetuneConfig, build_trainer

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo source, one image per species and split: 8 train rows."""
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, splits=["train"], limit_per_class=1))
    return out


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture()
def llava_json(tmp_path: Path) -> Path:
    """Six usable conversations (one of two rounds) and six that must be skipped, one per reason."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        tiny_image(i).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    tiny_image(9).save(tmp_path / "outside.png")
    records = [
        {
            "id": str(i),
            "image": f"{i}.png",
            "conversations": _turns("<image>\nWhat colour is the bus?", "Red."),
        }
        for i in range(5)
    ]
    records.append(
        {
            "id": "5",
            "image": "5.png",
            "conversations": _turns("<image>\nHow many?", "Two.", "And now?", "Three."),
        }
    )
    records += [
        {"id": "no-image", "conversations": _turns("What is a bus?", "A vehicle.")},
        {"id": "missing", "image": "gone.png", "conversations": _turns("<image>\nQ?", "A.")},
        {"id": "escape", "image": "../outside.png", "conversations": _turns("<image>\nQ?", "A.")},
        {"id": "broken", "image": "broken.png", "conversations": _turns("<image>\nQ?", "A.")},
        {"id": "two-slots", "image": "0.png", "conversations": _turns("<image><image>\nQ?", "A.")},
        {"id": "order", "image": "0.png", "conversations": _turns("<image>\nQ?", "A.")[::-1]},
    ]
    path = tmp_path / "llava_instruct.json"
    path.write_text(json.dumps(records))
    return path


def test_sampled_at_the_ratio_and_every_conversation_counted(
    demo: Path, llava_json: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mixture = load_mixture([str(demo)], fmt="finer", crop=True)
    with caplog.at_level(logging.WARNING, logger="finer"):
        mix_instructions(mixture, llava_json, 0.5, images=llava_json.parent / "images", seed=1)
    assert "skipped 6 of 12 conversations" in caplog.text
    for reason in ("1 no image", "2 missing or unreadable image", "1 image path outside", "2 malformed"):
        assert reason in caplog.text
    sources = mixture.dataset["source"]
    assert len(sources) == 12 and sources.count(INSTRUCTION_SOURCE) == 4  # round(0.5 x 8)
    counts = mixture.counts[INSTRUCTION_SOURCE]
    assert (counts["rows"], counts["skipped"], counts["not_sampled"]) == (12, 6, 2)

    row = mixture.dataset[len(sources) - 1]  # through the crop transform: no box, the image as it is
    assert row["image"].size == (32, 32) and row["bbox"] is None
    first = row["messages"][0]
    assert first["role"] == "user" and [b["type"] for b in first["content"]] == ["image", "text"]
    assert {m["role"] for m in row["messages"]} == {"user", "assistant"}

    # a ratio asking for more than there is takes everything, and says so
    again = load_mixture([str(demo)], fmt="finer")
    with caplog.at_level(logging.WARNING, logger="finer"):
        mix_instructions(again, llava_json, 2.0, images=llava_json.parent / "images")
    assert again.dataset["source"].count(INSTRUCTION_SOURCE) == 6 and "taking them all" in caplog.text


def test_trained_with_the_assistant_only_mask_and_summarised(
    demo: Path, llava_json: Path, tmp_path: Path
) -> None:
    config = FinetuneConfig.from_sources(
        {
            "model": str(tiny_vlm_path("llava")),
            "datasets": [str(demo)],
            "output_dir": str(tmp_path / "run"),
            "format": "direct",
            "instruction_data": str(llava_json),
            "instruction_images": str(llava_json.parent / "images"),
            "instruction_ratio": 1.0,
            "lora_r": 4,
            "lora_alpha": 8,
            "max_steps": 1,
            "report_to": "none",
        }
    )
    prepared = build_trainer(config)
    summary = prepared.mixture.summary()
    assert summary[INSTRUCTION_SOURCE] == {
        "rows": 12, "held_out": 0, "too_long": 0, "trained": 6, "skipped": 6, "not_sampled": 0
    }  # fmt: skip
    assert summary["demo"] == {"rows": 8, "held_out": 0, "too_long": 0, "trained": 8}

    rows = [r for r in prepared.trainer.train_dataset if r["source"] == INSTRUCTION_SOURCE]
    two_rounds = next(r for r in rows if len(r["messages"]) == 4)
    batch = prepared.trainer.data_collator([two_rounds])
    tokenizer = prepared.trainer.processing_class.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = tokenizer.decode(ids[labels != -100])
    assert "Two." in trained and "Three." in trained
    assert "How many" not in trained and "And now" not in trained
    assert trained.count(tokenizer.eos_token) == 2  # each answer's end-of-turn token


def test_bad_instruction_data_is_one_line_exit_2(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--model",
        str(tiny_vlm_path("llava")),
        "--dataset",
        str(demo),
        "--output-dir",
        str(out),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--instruction-data", str(bad)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "JSON list" in err
    assert not out.exists()
    with pytest.raises(FinerError, match="no usable conversation"):
        (tmp_path / "empty.json").write_text("[]")
        mix_instructions(load_mixture([str(demo)], fmt="direct"), tmp_path / "empty.json", 0.5)
