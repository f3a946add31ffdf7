"""`finer finetune` against a plain TRL `SFTTrainer` script: the same tiny model, data, LoRA and steps.

Both arms train the tiny LLaVA (`finer.testing`) on the demo's train split in the FINER format (three
assistant turns), LoRA r=16 on the language model, batch 8, `--steps` optimizer steps, no data workers, one
process each. The finer arm is `finer.train.sft.build_trainer` (the trainer `finer finetune` runs: family
registry, our marked chat template, `assistant_only_loss`, the part policies, the length check); the plain arm
is what a user would write with TRL alone: the same conversations, `SFTConfig(assistant_only_loss=True)`,
the same chat template and a `LoraConfig` on the same modules, and gradient checkpointing off as finer has
it on a CPU (TRL's default, on, recomputes activations: 0.37 s against 0.29 s per step here). A callback
times every step; the first `--warmup` steps are left out and the median of the rest is compared. The arms
alternate `--rounds` times in fresh processes, each on `--threads` torch threads (one by default: on a
shared CPU, a second thread mostly measures the neighbours). Goal: step-time ratio finer / plain <= 1.10.

    .venv/bin/python bench/finetune_overhead.py [--steps 50] [--warmup 5] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
BATCH = 8


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from its start to its end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def finer_trainer(model: Path, data: Path, out: Path, steps: int) -> Any:
    from finer.train.sft import FinetuneConfig, build_trainer

    config = FinetuneConfig(
        model=str(model),
        datasets=[str(data)],
        output_dir=str(out),
        format="finer",
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        max_steps=steps,
        batch_size=BATCH,
        logging_steps=10,
        save_steps=10_000,
        report_to="none",
    )
    return build_trainer(config).trainer


def plain_trainer(model: Path, data: Path, out: Path, steps: int) -> Any:
    """A TRL script a user would write: conversations in, LoRA on the language model's linear layers."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from finer.prompts import render  # the same conversations as the finer arm

    rows = datasets.load_from_disk(str(data))["train"]

    def to_messages(row: dict[str, Any]) -> dict[str, Any]:
        labels = {"superordinate": row["superordinate"], "coarse": row["coarse"][0], "fine": row["fine"][0]}
        return {"messages": render("train_finer", attributes=row["attributes_required"], **labels)}

    rows = rows.map(to_messages).select_columns(["image", "messages"])
    processor = AutoProcessor.from_pretrained(model)
    template = Path(__file__).parent.parent / "prompts/chat_templates/llava_1_5_training.jinja"
    processor.chat_template = processor.tokenizer.chat_template = template.read_text()
    lora = LoraConfig(
        **LORA,
        target_modules=r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(out),
        assistant_only_loss=True,
        max_length=None,
        per_device_train_batch_size=BATCH,
        learning_rate=2e-4,
        max_steps=steps,
        logging_steps=10,
        save_steps=10_000,
        report_to="none",
        warmup_steps=0.03,
        lr_scheduler_type="cosine",
        bf16=False,  # a CPU
        gradient_checkpointing=False,  # TRL's default is on; finer turns it on only on a GPU
    )
    return SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model),
        args=args,
        train_dataset=rows,
        processing_class=processor,
        peft_config=lora,
    )


def arm(name: str, model: Path, data: Path, steps: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        make = finer_trainer if name == "finer" else plain_trainer
        trainer = make(model, data, Path(out), steps)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        targets = trainer.model.peft_config["default"].target_modules
    kept = timer.times[warmup:]
    return {
        "arm": name,
        "median_s": statistics.median(kept),
        "steps": len(kept),
        "trainable": trainable,
        "targets": targets if isinstance(targets, str) else sorted(targets),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arm", choices=["finer", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # one measurement, in its own process
        import torch

        torch.set_num_threads(args.threads)
        result = arm(args.arm, args.work / "model", args.work / "demo", args.steps, args.warmup)
        print(json.dumps(result))
        return

    from finer.data.build import BuildConfig, build
    from finer.testing import build_tiny_vlm

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        build_tiny_vlm("llava", work_dir / "model")
        build(BuildConfig(source="demo", out=work_dir / "demo", splits=["train"]))
        results: dict[str, list[dict[str, Any]]] = {"finer": [], "plain": []}
        for _ in range(args.rounds):
            for name in ("plain", "finer"):
                options = {"--steps": args.steps, "--warmup": args.warmup, "--threads": args.threads}
                command = [sys.executable, __file__, "--arm", name, "--work", work]
                command += [str(x) for pair in options.items() for x in pair]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(results[name][-1], flush=True)
    medians = {name: statistics.median(r["median_s"] for r in runs) for name, runs in results.items()}
    trainable = {name: runs[0]["trainable"] for name, runs in results.items()}
    print(
        f"median step: finer {medians['finer'] * 1000:.1f} ms, plain TRL {medians['plain'] * 1000:.1f} ms, "
        f"ratio {medians['finer'] / medians['plain']:.3f} (goal <= 1.10); "
        f"trainable parameters finer {trainable['finer']:,}, plain {trainable['plain']:,}"
    )


if __name__ == "__main__":
    main()
