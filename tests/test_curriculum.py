"""`finer curriculum` on the tiny offline LLaVA: two stages (perception SFT with vision LoRA, then GRPO with
the vision side frozen) run, carry their weights forward, freeze what each says, evaluate after each stage,
skip finished stages, resume unfinished ones, refuse changed ones; bad recipes are one line and exit 2."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.records import (
    CURRICULUM_FILE,
    STAGE_EVAL_FILE,
    STAGE_FILE,
    CurriculumRecord,
    SplitScores,
    StageEvalRecord,
    StageEvaluation,
    StageRecord,
    StageSummary,
    read_record,
    read_stage_eval_file,
    read_stage_file,
)
from finer.run_folder import OutputLock
from finer.testing import tiny_vlm_path, unavailable_reason
from finer.train import curriculum, evaluate, rewards
from finer.train.curriculum import CURRICULA, CurriculumConfig, plan_stages, run_curriculum
from finer.train.sft import RUN_FILE, load_recipe, recipe_names
from tests.records_check import declared

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

LLAVA_MISSING = unavailable_reason("llava")
needs_llava = pytest.mark.skipif(LLAVA_MISSING is not None, reason=LLAVA_MISSING or "")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo source, one image per species and split: 8 training and 8 test images."""
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, limit_per_class=1))
    return out


def _recipe(demo: Path, out: Path, **top: Any) -> dict[str, Any]:
    """Perception (SFT: vision LoRA, projector in full, LM LoRA) then reasoning (GRPO: LM LoRA only)."""
    return {
        "model": str(tiny_vlm_path("llava")),
        "output_dir": str(out),
        "datasets": [str(demo)],
        "eval_batch_size": 8,
        "eval_max_new_tokens": 8,
        "defaults": {
            "lora_r": 4,
            "lora_alpha": 8,
            "max_steps": 2,
            "save_steps": 1,
            "logging_steps": 1,
            "report_to": "none",
        },
        "stages": [
            {
                "name": "perception",
                "trainer": "sft",
                "format": "finer",
                "train_vision": "lora",
                "train_projector": "full",
                "train_llm": "lora",
                "learning_rate": 1e-2,
            },
            {
                "name": "reasoning",
                "trainer": "grpo",
                "format": "open",
                "train_vision": "frozen",
                "train_projector": "frozen",
                "train_llm": "lora",
                "learning_rate": 1e-2,
                "batch_size": 2,
                "num_generations": 2,
                "max_completion_length": 8,
            },
        ],
        **top,
    }


def _varying(prompts: list, completions: list, **kwargs: object) -> list[float]:
    """Rewards that differ within each group, so that GRPO's advantages, and its gradient, are not zero."""
    return [float(i % 2) for i in range(len(completions))]


def _weights(folder: Path | str) -> dict[str, torch.Tensor]:
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        return {key.removeprefix("base_model.model."): fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118


def _lora_delta(adapter: dict[str, torch.Tensor], weight: str, scale: float) -> torch.Tensor:
    """What LoRA adds to `weight` (a module's `.weight`): scale · B @ A."""
    module = weight.removesuffix(".weight")
    return scale * adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]


def _part(weights: dict[str, torch.Tensor], root: str) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in weights.items() if name.startswith(root)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_llava
def test_two_stages_carry_weights_forward_freeze_evaluate_and_resume(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(rewards.REWARDS, "format", _varying)
    out = tmp_path / "curriculum"
    recipe = _recipe(demo, out)
    summary = run_curriculum(CurriculumConfig.from_sources(recipe))

    first, second = (out / "01-perception", out / "02-reasoning")
    assert [s["status"] for s in summary["stages"]] == ["trained", "trained"]
    assert [s["global_step"] for s in summary["stages"]] == [2, 2]
    assert summary == read_record(out / CURRICULUM_FILE, CurriculumRecord, "")
    declared(summary, CurriculumRecord)
    declared(summary["eval"], StageEvaluation)
    assert summary["final_model"] == str(second / "model")
    for folder, row in zip((first, second), summary["stages"], strict=True):  # stage.json, as declared
        stage = read_stage_file(folder)
        declared(stage, StageRecord)
        assert (stage["name"], stage["trainer"], stage["hash"]) == (row["name"], row["trainer"], row["hash"])
        assert stage["config"]["output_dir"] == str(folder / "train")
        declared(row, StageSummary)
        declared(row["eval"], SplitScores)
        assert read_stage_eval_file(folder) == {"settings": summary["eval"], "scores": row["eval"]}
    for stage in summary["stages"]:  # an evaluation after every stage, fine and coarse
        assert stage["eval"]["images"] == 8 and stage["eval"]["split"] == "test"
        assert 0 <= stage["eval"]["fine_accuracy"] <= 1 and 0 <= stage["eval"]["coarse_accuracy"] <= 1
    assert summary["stages"][1]["final_reward"] is not None

    # Stage 2 starts from stage 1's merged weights.
    run2 = json.loads((second / "train" / RUN_FILE).read_text())
    assert run2["config"]["model"] == str(first / "model")
    base, merged1, merged2 = (
        _weights(tiny_vlm_path("llava")),
        _weights(first / "model"),
        _weights(second / "model"),
    )
    adapter1, adapter2 = _adapter(first / "train"), _adapter(second / "train")
    vision_q = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert _lora_delta(adapter1, vision_q, 2.0).abs().sum() > 0  # stage 1 trained the vision tower
    assert torch.allclose(merged1[vision_q], base[vision_q] + _lora_delta(adapter1, vision_q, 2.0), atol=1e-6)
    projector = "model.multi_modal_projector.linear_1.weight"
    assert torch.equal(merged1[projector], adapter1[projector]) and not torch.equal(
        merged1[projector], base[projector]
    )
    llm_q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert _lora_delta(adapter2, llm_q, 2.0).abs().sum() > 0  # stage 2 trained the language model ...
    assert torch.allclose(merged2[llm_q], merged1[llm_q] + _lora_delta(adapter2, llm_q, 2.0), atol=1e-6)
    # ... and nothing else: its adapter holds LM LoRA only, vision tower and projector are stage 1's.
    assert adapter2 and all(".language_model." in k and ".lora_" in k for k in adapter2)
    assert run2["trainable_parameters"]["vision"]["trainable"] == 0
    assert run2["trainable_parameters"]["projector"]["trainable"] == 0
    for root in ("model.vision_tower.", "model.multi_modal_projector."):
        assert _equal(_part(merged2, root), _part(merged1, root))
        assert not _equal(_part(merged1, root), _part(base, root))
    assert [s["parts"] for s in summary["stages"]] == [
        {"vision": "lora", "projector": "full", "llm": "lora"},
        {"vision": "frozen", "projector": "frozen", "llm": "lora"},
    ]

    # Started again: nothing is trained, merged or evaluated again.
    def untouched(*args: object, **kwargs: object) -> dict:
        raise AssertionError("a finished stage was trained, merged or evaluated again")

    with monkeypatch.context() as patch:
        for name, (config_class, _) in curriculum.TRAINERS.items():
            patch.setitem(curriculum.TRAINERS, name, (config_class, untouched))
        patch.setattr(curriculum, "_merge", untouched)
        patch.setattr(evaluate, "evaluate_fine", untouched)
        cadence = {**recipe, "defaults": {**recipe["defaults"], "logging_steps": 5, "save_steps": 7}}
        again = run_curriculum(CurriculumConfig.from_sources(cadence))  # logging is no change of settings
    assert [s["status"] for s in again["stages"]] == ["skipped", "skipped"]
    assert [s["eval"] for s in again["stages"]] == [s["eval"] for s in summary["stages"]]

    # Stage 2 killed after its first checkpoint: it resumes from there, stage 1 is left alone.
    for path in (second / "train" / RUN_FILE, second / STAGE_EVAL_FILE):
        path.unlink()
    shutil.rmtree(second / "model")
    shutil.rmtree(second / "train" / "checkpoint-2")
    resumed = run_curriculum(CurriculumConfig.from_sources(recipe))
    assert [s["status"] for s in resumed["stages"]] == ["skipped", "resumed"]
    run2 = json.loads((second / "train" / RUN_FILE).read_text())
    assert run2["resumed_from"] == "checkpoint-1" and run2["global_step"] == 2
    assert (second / "model" / "config.json").is_file() and resumed["stages"][1]["eval"]["images"] == 8

    # A finished stage whose settings changed is refused, in one line, before anything runs.
    changed = _recipe(demo, out)
    changed["stages"][1]["learning_rate"] = 1e-3
    with pytest.raises(FinerError, match=r"stage 2 \(reasoning\) changed since it ran.*--overwrite") as err:
        run_curriculum(CurriculumConfig.from_sources(changed))
    assert "\n" not in str(err.value)
    changed["stages"][0]["learning_rate"] = 1e-3  # a change to stage 1 reaches stage 2 too
    with pytest.raises(FinerError, match=r"stage 1 \(perception\) changed"):
        run_curriculum(CurriculumConfig.from_sources(changed))
    changed["stages"][0]["learning_rate"] = 1e-2
    redone = run_curriculum(CurriculumConfig.from_sources({**changed, "overwrite": True}))
    assert [s["status"] for s in redone["stages"]] == ["skipped", "trained"]
    assert json.loads((second / "train" / RUN_FILE).read_text())["config"]["learning_rate"] == 1e-3

    # An adapter whose trained weights do not load (other module names) is refused, not merged as the
    # starting weights carried forward unchanged (docs/design.md §5).
    adapter_file = second / "train" / "adapter_model.safetensors"
    saved = load_file(adapter_file)
    save_file(
        {k.replace(".layers.", ".renamed."): v for k, v in saved.items()}, adapter_file, {"format": "pt"}
    )
    shutil.rmtree(second / "model")
    with pytest.raises(
        FinerError, match=r"adapter stage 2 \(reasoning\): \d+ of \d+ LoRA B matrices are all zero"
    ):
        run_curriculum(CurriculumConfig.from_sources(changed))
    assert not (second / "model").exists()


@needs_llava
def test_cli_prints_the_table(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One SFT stage through the command line: the summary table, and `--out` overriding the recipe."""
    recipe = _recipe(demo, tmp_path / "unused")
    recipe["stages"] = recipe["stages"][:1]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cli"
    with pytest.MonkeyPatch.context() as patch:  # keep the CLI from binding a log handler to capsys' stream
        patch.setattr(logging.getLogger("finer"), "handlers", [logging.NullHandler()])
        with pytest.raises(SystemExit) as exit_info:
            main(["curriculum", str(path), "--out", str(out)])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert "| stage | trainer | trained parts |" in stdout
    assert "| 1 perception | sft | vision lora, projector full, llm lora | trained | 2 |" in stdout
    assert f"wrote {out / CURRICULUM_FILE}" in stdout and not (tmp_path / "unused").exists()


def test_shipped_curricula_are_perception_then_reasoning(demo: Path, tmp_path: Path) -> None:
    assert {"demo-tiny", "qwen2.5-vl-7b"} <= set(recipe_names(CURRICULA))
    for name in ("demo-tiny", "qwen2.5-vl-7b"):
        recipe = load_recipe(name, CURRICULA)
        config = CurriculumConfig.from_sources(recipe, {"datasets": [str(demo)], "output_dir": str(tmp_path)})
        perception, reasoning = plan_stages(config, name)
        assert (perception.trainer, perception.config.train_vision) == ("sft", "lora")
        assert (reasoning.trainer, reasoning.config.train_vision) == ("grpo", "frozen")
        assert reasoning.config.reward_weights == {"accuracy": 0.9, "format": 0.1}
        assert (
            reasoning.config.model == str(perception.model_dir) and perception.config.model == recipe["model"]
        )
        cropped = name == "demo-tiny"  # the built demo, cropped when read, in training and scoring alike
        assert perception.config.crop_to_bbox == reasoning.config.crop_to_bbox == config.eval_crop_to_bbox
        assert config.eval_crop_to_bbox == cropped
    assert not any(tmp_path.iterdir())


def test_each_stage_is_scored_with_its_own_prompts(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage's `prompts_dir` reaches its evaluation (as `finer finetune` scores its run) and eval.json."""
    prompts = str(tmp_path / "prompts")
    recipe = _recipe(demo, tmp_path / "o")
    recipe["stages"][1]["prompts_dir"] = prompts
    stages = plan_stages(CurriculumConfig.from_sources(recipe))
    asked: list[object] = []

    def scored(model: object, processor: object, rows: object, fmt: str, **options: object) -> dict:
        asked.append(options.get("prompts_dir"))
        return {"images": 8, "fine_accuracy": 0.5, "chance": 0.125, "failed": 0, "samples": []}

    monkeypatch.setattr(evaluate, "evaluate_fine", scored)
    settings = {
        "split": "test",
        "datasets": [str(demo)],
        "format": "finer",
        "crop_to_bbox": False,
        "batch_size": 8,
        "max_new_tokens": 8,
    }
    for stage in stages:
        stage.folder.mkdir(parents=True)
        curriculum._evaluate(stage, settings, object(), None)
    assert asked == [None, prompts]
    stored = [read_stage_eval_file(stage.folder) for stage in stages]  # eval.json, as declared
    for record in stored:
        declared(record, StageEvalRecord)
        declared(record["settings"], StageEvaluation)
        declared(record["scores"], SplitScores)
    assert [record["settings"] for record in stored] == [settings, {**settings, "prompts_dir": prompts}]


_SETTINGS = {
    "split": "test",
    "datasets": ["d"],
    "format": "finer",
    "crop_to_bbox": False,
    "batch_size": 8,
    "max_new_tokens": 8,
}


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ('{"settings": ', "not valid JSON"),
        (json.dumps({"settings": _SETTINGS}), "lacks `scores`"),
        (json.dumps({"scores": {}}), "lacks `settings`"),
        (
            json.dumps({"settings": _SETTINGS, "scores": {"split": "test", "images": 8}}),
            "lacks `scores.fine_accuracy`, `scores.chance`, `scores.samples`",
        ),
    ],
)
def test_a_damaged_stage_eval_file_is_one_line_naming_it_and_the_fix(
    stored: str, problem: str, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage's eval.json that is not JSON or lacks a key is refused, neither a KeyError nor scored again."""

    def unasked(*args: object, **kwargs: object) -> dict:
        raise AssertionError("the stage was scored again")

    monkeypatch.setattr(evaluate, "evaluate_fine", unasked)
    stage = plan_stages(CurriculumConfig.from_sources(_recipe(demo, tmp_path / "o")))[0]
    stage.folder.mkdir(parents=True)
    path = stage.folder / STAGE_EVAL_FILE
    path.write_text(stored)
    with pytest.raises(FinerError) as err:
        curriculum._evaluate(stage, _SETTINGS, object(), None)
    message = str(err.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message
    assert message.endswith("; delete it to score the stage again")


GOOD_STAGE = {"trainer": "sft", "max_steps": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": [{"trainer": "dpo"}]}, "stage 1: trainer must be one of sft, grpo, not 'dpo'"),
        ({"stages": [{"trainer": "sft", "lr": 1}]}, "stage 1 (sft): unknown key 'lr'; known keys: model,"),
        (
            {"stages": [GOOD_STAGE, {"trainer": "grpo", "num_generations": "many"}]},
            "num_generations must be int",
        ),
        ({"stages": []}, "no stages"),
        ({"stages": {"trainer": "sft"}}, "stages must be a list of mappings"),
        ({"model": None}, "no model"),
        ({"stages": [{"trainer": "sft", "output_dir": "x"}]}, "'output_dir' is set by the curriculum"),
        ({"defaults": {"lr": 1}}, "defaults: unknown key 'lr'"),
        ({"stage": []}, "unknown key 'stage'"),
        ({"datasets": ["{tmp}/missing"]}, "cannot load dataset"),
        ({"eval_split": "validation"}, "has no split 'validation'"),
        ({"model": "{tmp}/no-model"}, "cannot read the config of model"),  # refused by the trainer itself
    ],
)
def test_bad_recipes_are_one_line_exit_2_and_write_nothing(
    change: dict[str, Any], message: str, demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = {**_recipe(demo, tmp_path / "o"), "stages": [GOOD_STAGE], **change}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("{tmp}", str(tmp_path)))
    capsys.readouterr()  # building the demo and the tiny model is not the command's output
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.getLogger("finer"), "handlers", [logging.NullHandler()])
        with pytest.raises(SystemExit) as exit_info:
            main(["curriculum", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()


def test_unknown_curriculum_names_the_shipped_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["curriculum", "no-such-curriculum"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no recipe 'no-such-curriculum'" in err and "demo-tiny" in err


@needs_llava
def test_grpo_reads_a_recipe_and_the_command_line_overrides_it(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`finer grpo --config`, the way a curriculum stage is configured; options win over the recipe."""
    recipe = {
        "model": str(tiny_vlm_path("llava")),
        "datasets": [str(demo)],
        "format": "choice",
        "choices": 3,
        "reward_weights": {"accuracy": 0.8, "format": 0.2},
        "batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 4,
        "max_steps": 5,
        "lora_r": 4,
        "lora_alpha": 8,
        "report_to": "none",
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "grpo"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.getLogger("finer"), "handlers", [logging.NullHandler()])
        for argv, code in [
            (["--max-steps", "1"], 0),
            (["--resume"], 2),  # finished: --resume has nothing to continue
        ]:
            with pytest.raises(SystemExit) as exit_info:
                main(["grpo", "--config", str(path), "--output-dir", str(out), *argv])
            assert exit_info.value.code == code
    summary = json.loads((out / RUN_FILE).read_text())
    assert summary["global_step"] == 1 and summary["config"]["choices"] == 3
    assert summary["reward_weights"] == {"accuracy": 0.8, "format": 0.2}
    assert "holds a finished run; pass --overwrite" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**recipe, "lr": 1}))
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--config", str(path), "--output-dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "unknown key 'lr'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "perception", ', "not valid JSON"),
        ('{"name": "perception"}', "lacks `trainer`, `hash`, `config`"),
    ],
)
def test_a_damaged_stage_file_is_one_line_naming_it_and_the_fix(
    text: str, problem: str, demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "curriculum"
    path = out / "01-perception" / STAGE_FILE
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(FinerError) as err:
        run_curriculum(CurriculumConfig.from_sources(_recipe(demo, out)))
    message = str(err.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message
    assert message.endswith("; pass --overwrite to re-run the stage and those after it")
    assert [p.name for p in path.parent.iterdir()] == [STAGE_FILE]  # nothing ran


def test_a_second_curriculum_into_the_same_folder_is_refused(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "curriculum"
    with OutputLock(out), pytest.raises(FinerError, match="being written by another run"):
        run_curriculum(CurriculumConfig.from_sources(_recipe(demo, out)))
    assert not out.exists()
