"""`finer finetune` on the tiny offline VLMs: TRL's masking token by token, LoRA plans per family, training,
adapters, mixtures, recipes and the errors a user can fix."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

from finer.cli import main
from finer.data.build import BuildConfig, build
from finer.errors import FinerError
from finer.models.families import (
    FAMILIES,
    Family,
    check_trainable,
    detect_family,
    part_of,
    plan_training,
    resolve_chat_template,
)
from finer.prompts import render
from finer.records import RunRecord
from finer.testing import TINY_FAMILIES, tiny_vlm_path, unavailable_reason
from finer.testing.tiny_vlm import LLAVA_CHAT_TEMPLATE
from finer.train.data import load_mixture
from finer.train.sft import (
    RUN_FILE,
    FinetuneConfig,
    build_trainer,
    describe_loss,
    load_recipe,
    run_finetune,
)
from tests.records_check import declared

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

TINY = [
    pytest.param(
        f, marks=pytest.mark.skipif(unavailable_reason(f) is not None, reason=unavailable_reason(f) or "")
    )
    for f in TINY_FAMILIES
]
FORMATS = ["direct", "finer"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo source, one image per species and split: 8 train conversations."""
    out = tmp_path_factory.mktemp("data") / "demo"
    build(BuildConfig(source="demo", out=out, limit_per_class=1))
    return out


def _config(family: str, demo: Path, out: Path, **overrides: object) -> FinetuneConfig:
    settings: dict[str, object] = {
        "model": str(tiny_vlm_path(family)),
        "datasets": [str(demo)],
        "output_dir": str(out),
        "lora_r": 8,
        "lora_alpha": 16,
        "batch_size": 8,
        "max_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        **overrides,
    }
    return FinetuneConfig.from_sources(settings)


def _runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of positions whose label is trained (not -100)."""
    runs: list[list[int]] = []
    for pos in (labels != -100).nonzero().flatten().tolist():
        if runs and runs[-1][-1] == pos - 1:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    return runs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", TINY)
def test_labels_are_exactly_the_answers_and_their_end_of_turn(
    family: str, fmt: str, demo: Path, tmp_path: Path
) -> None:
    """The batch SFTTrainer trains on, from its own collator: decode every trained position."""
    trainer = build_trainer(_config(family, demo, tmp_path / "run", format=fmt)).trainer
    entry = detect_family(trainer.model.config.model_type)
    tokenizer = trainer.processing_class.tokenizer
    rows = [trainer.train_dataset[i] for i in (0, 3)]  # different species: different lengths, so padding
    batch = trainer.data_collator([dict(row) for row in rows])
    labels, input_ids, attention = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (attention == 0).any(), "expected padding in the batch"
    assert (labels[attention == 0] == -100).all()
    assert (labels[labels != -100] == input_ids[labels != -100]).all()
    image_token = trainer.processing_class.image_token_id
    assert not (labels == image_token).any() and (input_ids == image_token).any()
    end_id = tokenizer.convert_tokens_to_ids(entry.turn_end.strip())
    for row, sample_labels in zip(rows, labels, strict=True):
        answers = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(answers) == (3 if fmt == "finer" else 1)
        runs = _runs(sample_labels)
        decoded = [tokenizer.decode(sample_labels[run].tolist()) for run in runs]
        assert [text.removeprefix(" ") for text in decoded] == [a + entry.turn_end for a in answers]
        for run in runs:  # every assistant turn's end-of-turn token is trained
            assert end_id in sample_labels[run].tolist()


@pytest.mark.parametrize("entry", FAMILIES, ids=lambda f: f.name)
def test_every_family_template_marks_each_answer_and_its_end_of_turn(entry: Family) -> None:
    """Character level, for the families without a tiny model too: the marked spans are the answers + end."""
    import trl
    from transformers.utils.chat_template_utils import render_jinja_template

    if entry.template.startswith("finer:"):
        folder = importlib.resources.files("finer.prompt_templates") / "chat_templates"
        template = (folder / entry.template.removeprefix("finer:")).read_text(encoding="utf-8")
    else:
        template = (Path(trl.__file__).parent / "chat_templates" / entry.template).read_text()
    messages = render(
        "train_finer", superordinate="Bird", coarse="Owl", fine="Barn Owl", attributes=["a", "b"]
    )
    (text,), (spans,) = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        return_assistant_tokens_mask=True,
        bos_token="<s>",
        eos_token="</s>",
    )
    answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
    assert [text[a:b].removeprefix(" ") for a, b in spans] == [a + entry.turn_end for a in answers]


def _adapter_keys(folder: Path) -> list[str]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as fh:
        return list(fh.keys())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", TINY)
def test_overfits_a_batch_and_saves_a_language_model_adapter(
    family: str, fmt: str, demo: Path, tmp_path: Path
) -> None:
    """One batch of all 8 conversations, eight steps: the loss is finite and falls; only LM LoRA is saved."""
    out = tmp_path / "run"
    overfit = {"max_steps": 8, "learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0}
    summary = run_finetune(_config(family, demo, out, format=fmt, **overfit))
    losses = json.loads((out / RUN_FILE).read_text())["losses"]
    assert len(losses) == 8 and torch.isfinite(torch.tensor(losses)).all()
    # LoRA cannot lift a random model's logits far (its head and final norm stay frozen), but steadily
    assert losses[-1] < 0.97 * losses[0] and max(losses[1:]) < losses[0], losses
    assert summary["samples"] == {"demo": {"rows": 8, "held_out": 0, "too_long": 0, "trained": 8}}
    llm_root = _family(family).llm[0]
    keys = _adapter_keys(out)
    assert keys and all("lora_" in k and f".{llm_root}." in k for k in keys), "no vision or projector keys"
    assert (out / "adapter_config.json").is_file() and (out / "processor_config.json").is_file()


def _family(tiny: str) -> Family:
    """The registry entry of a tiny model."""
    return detect_family(json.loads((tiny_vlm_path(tiny) / "config.json").read_text())["model_type"])


def test_adapter_keys_follow_the_part_policies(demo: Path, tmp_path: Path) -> None:
    """Projector in full and vision LoRA: projector weights in modules_to_save, vision LoRA, nothing else."""
    config = _config("llava", demo, tmp_path / "run", train_projector="full", train_vision="lora")
    trainer = build_trainer(config).trainer
    trainer.save_model(config.output_dir)
    keys = _adapter_keys(Path(config.output_dir))
    projector = [k for k in keys if ".multi_modal_projector." in k]
    vision = [k for k in keys if ".vision_tower." in k]
    llm = [k for k in keys if ".language_model." in k]
    assert projector and all("lora_" not in k for k in projector)
    assert {k.rsplit(".", 2)[-2] for k in projector} == {"linear_1", "linear_2"}
    assert vision and all("lora_" in k for k in vision)
    assert llm and all("lora_" in k for k in llm)
    assert len(projector) + len(vision) + len(llm) == len(keys)


def _tiny_config(model_type: str) -> PretrainedConfig:
    """A few-kilobyte config of each registered family's architecture."""
    import transformers as tf

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 128, "head_dim": 16}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}  # fmt: skip
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
    qwen_vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 32,
    }
    clip = {"model_type": "clip_vision_model", **vision}
    return {
        "llava": lambda: tf.LlavaConfig(vision_config=clip, text_config={"model_type": "llama", **text}),
        "llava_next": lambda: tf.LlavaNextConfig(
            vision_config=clip, text_config={"model_type": "llama", **text}
        ),
        "qwen2_vl": lambda: tf.Qwen2VLConfig(
            text_config={**text, **rope},
            vision_config={"depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_size": 32},
        ),
        "qwen2_5_vl": lambda: tf.Qwen2_5_VLConfig(
            text_config={**text, **rope}, vision_config={**qwen_vision, "fullatt_block_indexes": [0]}
        ),
        "qwen3_vl": lambda: tf.Qwen3VLConfig(
            text_config={**text, **rope}, vision_config={**qwen_vision, "deepstack_visual_indexes": [0]}
        ),
        "idefics3": lambda: tf.Idefics3Config(
            vision_config=vision, text_config={"model_type": "llama", **text}, scale_factor=2
        ),
        "smolvlm": lambda: tf.SmolVLMConfig(
            vision_config=vision, text_config={"model_type": "llama", **text}, scale_factor=2
        ),
        "gemma3": lambda: tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4),
    }[model_type]()


POLICIES = [
    ("lora", "frozen", "frozen"),
    ("lora", "lora", "full"),
    ("full", "full", "frozen"),
    ("frozen", "frozen", "full"),
]


@pytest.mark.parametrize("model_type", [t for f in FAMILIES for t in f.model_types])
def test_every_family_trains_exactly_the_parts_asked_for(model_type: str) -> None:
    """On each family's real architecture (tiny config): LoRA on the LM never touches vision or projector."""
    from peft import get_peft_model

    entry = detect_family(model_type)
    for llm, vision, projector in POLICIES:
        model = AutoModelForImageTextToText.from_config(_tiny_config(model_type))
        plan = plan_training(model, entry, llm=llm, vision=vision, projector=projector)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = get_peft_model(model, plan.lora_config(4, 8, 0.0))
        # PEFT warns when weight tying is asked for a head it does not train, or not asked for one it does
        tying = [str(w.message) for w in caught if "ensure_weight_tying" in str(w.message)]
        assert not tying, (model_type, llm, tying)
        counts = check_trainable(peft_model, plan)  # raises if a frozen part trains or a trained one does not
        for part, policy in plan.policies.items():
            trainable, total = counts.get(part, (0, 0))
            assert (trainable == total) if policy == "full" else (trainable > 0) == (policy == "lora")
        for name, _ in peft_model.named_parameters():
            if ".lora_" in name:
                assert plan.policies[part_of(name.split(".lora_")[0], entry)] == "lora", name


def test_unknown_family_is_one_line_with_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "runs" / "x"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(model), "--dataset", "unused", "--output-dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'bert'" in err
    assert all(f.name in err for f in FAMILIES) and "finer/models/families.py" in err
    assert not out.exists()


def test_finer_format_without_attributes_names_the_column_and_the_fix(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bare = tmp_path / "bare"
    dd = datasets.load_from_disk(str(demo))
    dd.map(lambda _: {"attributes_required": []}).save_to_disk(str(bare))
    out = tmp_path / "runs" / "x"
    capsys.readouterr()
    args = [
        "finetune",
        "--model",
        str(tiny_vlm_path("llava")),
        "--dataset",
        str(bare),
        "--output-dir",
        str(out),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "attributes_required" in err and "--knowledge" in err
    assert not out.exists()
    with pytest.raises(FinerError, match="attributes_visible.*finer ground"):
        load_mixture([str(demo)], fmt="finer", attributes="visible")
    assert load_mixture([str(bare)], fmt="direct").summary()["demo"]["rows"] == 8


def test_mixture_counts_every_sample_and_holds_out_a_source(demo: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    datasets.load_from_disk(str(demo)).map(lambda _: {"source": "other"}).save_to_disk(str(other))
    mixture = load_mixture([str(demo), str(other)], fmt="finer", hold_out="other")
    assert len(mixture.dataset) == 8 and set(mixture.dataset["source"]) == {"demo"}
    assert {s: dict(c) for s, c in mixture.counts.items()} == {
        "demo": {"rows": 8},
        "other": {"rows": 8, "held_out": 8},
    }
    with pytest.raises(FinerError, match="matches no source"):
        load_mixture([str(demo)], fmt="finer", hold_out="cub200")
    row = load_mixture([str(demo)], fmt="direct", crop=True).dataset[0]  # cropped when read
    x, y, w, h = row["bbox"]
    assert row["image"].size == (round(x + w) - round(x), round(y + h) - round(y))


def test_too_long_conversations_are_dropped_and_counted(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prepared = build_trainer(_config("llava", demo, tmp_path / "a", max_length=None))
    collate = prepared.trainer.data_collator
    lengths = sorted(collate([dict(row)])["input_ids"].shape[1] for row in prepared.trainer.train_dataset)
    limit = lengths[len(lengths) // 2]
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < len(lengths)
    with caplog.at_level(logging.WARNING, logger="finer"):
        prepared = build_trainer(_config("llava", demo, tmp_path / "b", max_length=limit))
    counts = prepared.mixture.summary()["demo"]
    assert counts == {"rows": 8, "held_out": 0, "too_long": expected, "trained": 8 - expected}
    assert len(prepared.trainer.train_dataset) == 8 - expected
    assert f"dropped {expected} conversation(s) longer than --max-length {limit}" in caplog.text


def test_recipes_load_and_the_command_line_overrides_them() -> None:
    recipe = load_recipe("demo-tiny")
    config = FinetuneConfig.from_sources(recipe, {"learning-rate": 1, "format": "direct"})
    assert config.model == recipe["model"] and config.learning_rate == 1.0 and config.format == "direct"
    for name in ("llava-1.5-7b", "qwen2.5-vl-7b", "smolvlm-256m"):
        FinetuneConfig.from_sources(load_recipe(name))
    paper = FinetuneConfig.from_sources(load_recipe("llava-1.5-7b"))
    assert (paper.lora_r, paper.lora_alpha, paper.learning_rate, paper.epochs) == (128, 256, 2e-4, 1.0)
    with pytest.raises(FinerError, match="unknown key 'lr'"):
        FinetuneConfig.from_sources(recipe, {"lr": 1}, origin=("recipe", "command line"))
    with pytest.raises(FinerError, match="train_llm must be one of lora, full, frozen"):
        FinetuneConfig.from_sources({"train_llm": "half"})
    with pytest.raises(FinerError, match="no recipe 'nope'"):
        load_recipe("nope")


def test_resume_continues_from_the_last_checkpoint(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    run_finetune(_config("llava", demo, out, max_steps=2, save_steps=1, format="direct"))
    (out / RUN_FILE).unlink()  # as if killed after its checkpoints
    with pytest.raises(FinerError, match="unfinished run.*--resume"):
        run_finetune(_config("llava", demo, out, max_steps=3, format="direct"))
    with caplog.at_level(logging.INFO, logger="finer"):
        summary = run_finetune(_config("llava", demo, out, max_steps=3, format="direct", resume=True))
    assert summary["resumed_from"] == "checkpoint-2" and summary["global_step"] == 3
    assert "resuming from" in caplog.text and (out / RUN_FILE).is_file()
    # The Trainer's mean loss covers the resumed steps only, and the line says so.
    assert summary["train_loss_steps"] == [3, 3] and describe_loss(summary).endswith(" over steps 3–3")
    with pytest.raises(FinerError, match="finished run.*--overwrite"):
        run_finetune(_config("llava", demo, out, format="direct"))


def test_an_interrupted_run_keeps_the_earlier_adapter_and_resume_keeps_its_checkpoints(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Interrupted after its first checkpoint, an `overwrite` run leaves the earlier adapter in place and
    says how to go on; `--resume` over a recipe's `overwrite: true` continues from that checkpoint."""
    from transformers import Trainer

    out = tmp_path / "run"
    run_finetune(_config("llava", demo, out, max_steps=1, format="direct"))
    earlier = (out / "adapter_model.safetensors").read_bytes()
    save = Trainer._save_checkpoint

    def save_then_interrupt(self: Trainer, *args: object, **kwargs: object) -> None:
        save(self, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C right after checkpoint-1

    recipe = dataclasses.asdict(_config("llava", demo, out, max_steps=3, save_steps=1, format="direct"))
    recipe["overwrite"] = True
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="finer"):
        patch.setattr(Trainer, "_save_checkpoint", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(FinetuneConfig.from_sources(recipe))
    assert (out / "adapter_model.safetensors").read_bytes() == earlier and (out / RUN_FILE).is_file()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("interrupted")]
    assert len(said) == 1 and "checkpoint-1" in said[0] and "--resume" in said[0]
    resumed = run_finetune(FinetuneConfig.from_sources(recipe, {"resume": True}))
    assert resumed["resumed_from"] == "checkpoint-1" and resumed["global_step"] == 3
    assert json.loads((out / RUN_FILE).read_text())["global_step"] == 3
    assert (out / "adapter_model.safetensors").read_bytes() != earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder, lock or old run left


def test_resume_wins_over_a_recipes_overwrite_and_both_on_the_command_line_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = load_recipe("demo-tiny")
    assert recipe["overwrite"] is True
    config = FinetuneConfig.from_sources(recipe, {"resume": True}, origin=("recipe", "command line"))
    assert config.resume and not config.overwrite
    later = FinetuneConfig.from_sources({"resume": True}, {"overwrite": True})
    assert later.overwrite and not later.resume
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--config", "demo-tiny", "--resume", "--overwrite"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "command line: resume and overwrite together" in err and "pass one" in err


def test_llava_training_template_keeps_the_inference_prompt() -> None:
    """Our LLaVA-1.5 template renders llava-hf's prompt after BOS, answers closed by </s>: same inference."""
    processor = AutoProcessor.from_pretrained(tiny_vlm_path("llava"))
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE
    assert resolve_chat_template(detect_family("llava"), processor).endswith("llava_1_5_training.jinja")
    messages = render("train_finer", superordinate="Bird", coarse="Owl", fine="Barn Owl", attributes=["x"])[
        :3
    ]
    ask = {"add_generation_prompt": True, "tokenize": False}
    theirs = processor.apply_chat_template(messages, chat_template=LLAVA_CHAT_TEMPLATE, **ask)
    assert processor.apply_chat_template(messages, **ask) == "<s>" + theirs.replace(" USER:", "</s>USER:")


def test_unmarked_unknown_template_error_names_no_checkout_path() -> None:
    """A pip user has no prompts/ folder: the error points at the installed package instead."""
    processor = AutoProcessor.from_pretrained(tiny_vlm_path("qwen2_vl"))
    processor.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(FinerError, match="--chat-template") as err:
        resolve_chat_template(detect_family("qwen2_vl"), processor)
    assert "prompts/" not in str(err.value) and "finer.prompt_templates package" in str(err.value)


def test_cli_runs_the_demo_recipe_end_to_end(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "demo"
    model = str(tiny_vlm_path("llava"))
    main_args = ["finetune", "--config", "demo-tiny", "--model", model, "--dataset", str(demo),
                 "--output-dir", str(out), "--max-steps", "1", "--set", "eval_batch_size=8"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(main_args)
    assert exit_info.value.code == 0
    summary = json.loads((out / RUN_FILE).read_text())
    declared(summary, RunRecord)
    assert summary["eval"]["images"] == 8 and 0 <= summary["eval"]["fine_accuracy"] <= 1
    assert summary["family"] == "llava-1.5" and summary["modules_to_save"]
    shutil.rmtree(out)


def test_two_cpu_processes_train_as_one_group(demo: Path, tmp_path: Path) -> None:
    """The README's `torchrun --nproc_per_node 2 -m finer finetune --config demo-tiny` (what `accelerate
    launch` runs) from a fresh folder: the first process builds the tiny model while the other waits, one
    gloo group trains (each process half of every batch), one process writes the summary."""
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = [str(torchrun), "--nproc_per_node", "2", "-m", "finer", "finetune", "--config", "demo-tiny",
            "--dataset", str(demo), "--max-steps", "2", "--batch-size", "4",
            "--set", "eval_split=null"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "runs" / "demo-lora"
    assert done.stdout.count("wrote runs/demo-lora") == 1
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0  # 8 conversations, 2 x 4 per step: one epoch a step (alone: half)
    assert json.loads((out / RUN_FILE).read_text())["global_step"] == 2
