"""GPU check of every tiny family: bf16 LoRA steps, 4-bit QLoRA and Liger-kernel steps, batched generation.

Run by `bench/gpu_check.sh` (CI runs it without a GPU: it then prints one line and exits 0). On a CUDA
device, for each family of `finer.testing.TINY_FAMILIES` (one per registry family) it

- loads the tiny random-weight model in bf16, wraps it in the LoRA the registry plans for `--train-llm lora`
  (`plan_training`: targets under the language model's root only), and runs `--steps` optimizer steps on a
  batch of `--batch` image conversations (loss on every non-padding, non-image token: a throughput check,
  not the training recipe, whose label masking the CPU tests check);
- generates `--new-tokens` greedy tokens for a left-padded batch of `--batch` questions;

then, when installed, one 4-bit QLoRA step (bitsandbytes NF4, LLaVA) and one step with Liger kernels applied
(Qwen2.5-VL). It prints tokens/s and peak GPU memory per family as a Markdown table, ready for
bench/RESULTS.md, and exits 1 if any row failed. Tiny models measure the pipeline's overhead on the device
(kernel launches, processor, PEFT), not a real model's speed.

    .venv/bin/python bench/gpu_check.py [--steps 5] [--batch 8] [--new-tokens 32] [--families llava,gemma3]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from finer.errors import one_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

# transformers, PEFT and the tiny models are imported where used, so that the no-GPU path costs only torch.

NO_CUDA = "gpu_check: no CUDA device (torch {torch}, built for CUDA {cuda}): nothing to measure, skipped"
QUESTIONS = ("What bird is this?", "Which attributes can you see?", "Name the species.", "Is it a gull?")


@dataclass
class Row:
    """One line of the table: what ran, its throughput and the device memory it peaked at."""

    family: str
    check: str
    train_tokens_s: float | None = None
    generate_tokens_s: float | None = None
    loss: float | None = None
    peak_mib: float | None = None
    note: str = ""

    def markdown(self) -> str:
        def num(value: float | None, fmt: str) -> str:
            return "" if value is None else format(value, fmt)

        cells = (
            self.family,
            self.check,
            num(self.train_tokens_s, ",.0f"),
            num(self.generate_tokens_s, ",.0f"),
            num(self.loss, ".3f"),
            num(self.peak_mib, ",.0f"),
            self.note,
        )
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| family | check | train tokens/s | generate tokens/s | last loss | peak MiB | note |\n"
    "|---|---|---|---|---|---|---|"
)


def conversations(batch: int, *, answered: bool) -> list[list[dict[str, object]]]:
    """`batch` one-image conversations of different lengths (so the batch pads), answered or not."""
    from finer.testing import tiny_image

    out = []
    for i in range(batch):
        question = " ".join([QUESTIONS[i % len(QUESTIONS)]] * (1 + i % 3))
        turns: list[dict[str, object]] = [
            {
                "role": "user",
                "content": [{"type": "image", "image": tiny_image(i)}, {"type": "text", "text": question}],
            }
        ]
        if answered:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": "A Laysan Albatross."}]})
        out.append(turns)
    return out


def batch_inputs(
    processor: ProcessorMixin, batch: int, *, answered: bool, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The processor's padded batch on `device`, pixel values in `dtype`; `labels` when `answered`."""
    processor.tokenizer.padding_side = "left"
    inputs = processor.apply_chat_template(
        conversations(batch, answered=answered),
        add_generation_prompt=not answered,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
    )
    inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    if answered:
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        labels[torch.isin(labels, torch.tensor(processor.image_token_ids, device=device))] = -100
        inputs["labels"] = labels
    return inputs


def load(
    family: str, device: torch.device, dtype: torch.dtype, **kwargs: object
) -> tuple[ProcessorMixin, PreTrainedModel]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finer.testing import tiny_vlm_path

    path = tiny_vlm_path(family)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype, **kwargs)
    return processor, model if "quantization_config" in kwargs else model.to(device)


def with_lora(model: PreTrainedModel) -> torch.nn.Module:
    """The LoRA `finer finetune --train-llm lora` plans for this family: language-model modules only."""
    from peft import get_peft_model

    from finer.models.families import detect_family, plan_training

    plan = plan_training(model, detect_family(model.config.model_type), llm="lora")
    return get_peft_model(model, plan.lora_config(r=8, alpha=16, dropout=0.0))


def train_steps(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int, device: torch.device
) -> tuple[float, float]:
    """`steps` AdamW steps on one batch after one warm-up step; (trained tokens per second, last loss)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up: kernels, allocator
    synchronize(device)
    start = time.perf_counter()
    loss = 0.0
    for _ in range(steps):
        loss = step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"loss is {loss}")
    return int(inputs["attention_mask"].sum()) * steps / elapsed, loss


def generate_tokens_s(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> float:
    """Greedy, left-padded batch, exactly `new_tokens` per row (EOS ignored so the count is fixed)."""
    model.eval()
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    device = inputs["input_ids"].device
    with torch.no_grad():
        model.generate(**inputs, **kwargs, max_length=None)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        output = model.generate(**inputs, **kwargs, max_length=None)
        synchronize(device)
    elapsed = time.perf_counter() - start
    generated = (output.shape[1] - inputs["input_ids"].shape[1]) * output.shape[0]
    return generated / elapsed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def check_family(
    family: str, *, device: torch.device, dtype: torch.dtype, steps: int, batch: int, new_tokens: int
) -> Row:
    """LoRA steps then batched generation for one tiny family."""
    reset_peak(device)
    processor, model = load(family, device, dtype)
    peft_model = with_lora(model)
    train_inputs = batch_inputs(processor, batch, answered=True, device=device, dtype=dtype)
    train_s, loss = train_steps(peft_model, train_inputs, steps, device)
    generate_inputs = batch_inputs(processor, batch, answered=False, device=device, dtype=dtype)
    generate_s = generate_tokens_s(peft_model, generate_inputs, new_tokens)
    return Row(family, f"{dtype_name(dtype)} LoRA", train_s, generate_s, loss, peak_mib(device))


def check_qlora(device: torch.device, steps: int, batch: int) -> Row:
    """One 4-bit NF4 QLoRA step on the tiny LLaVA (bf16 compute), LoRA on the language model."""
    family = "llava"
    if importlib.util.find_spec("bitsandbytes") is None:
        return Row(
            family, "4-bit QLoRA", note="skipped: bitsandbytes not installed (pip install -e '.[qlora]')"
        )
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    reset_peak(device)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    processor, model = load(
        family, device, torch.bfloat16, quantization_config=quantization, device_map={"": device.index or 0}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    inputs = batch_inputs(processor, batch, answered=True, device=device, dtype=torch.bfloat16)
    train_s, loss = train_steps(with_lora(model), inputs, steps, device)
    return Row(family, "4-bit QLoRA", train_s, None, loss, peak_mib(device))


def check_liger(device: torch.device, steps: int, batch: int) -> Row:
    """LoRA steps with Liger's fused kernels patched into the tiny Qwen2.5-VL, as `use_liger_kernel` does."""
    family = "qwen2_5_vl"
    if importlib.util.find_spec("liger_kernel") is None:
        return Row(
            family, "Liger LoRA", note="skipped: liger-kernel not installed (pip install -e '.[liger]')"
        )
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    reset_peak(device)
    processor, model = load(family, device, torch.bfloat16)
    _apply_liger_kernel_to_instance(model=model)
    inputs = batch_inputs(processor, batch, answered=True, device=device, dtype=torch.bfloat16)
    train_s, loss = train_steps(with_lora(model), inputs, steps, device)
    return Row(family, "Liger LoRA", train_s, None, loss, peak_mib(device))


def guarded(family: str, check: str, run: Callable[[], Row]) -> Row:
    """A failing check becomes a row saying why, so one family cannot hide the others' numbers."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - reported in the table, and the exit code
        return Row(family, check, note=f"FAILED: {one_line(error)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per family")
    parser.add_argument("--batch", type=int, default=8, help="conversations per batch")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per row")
    parser.add_argument("--families", default="", help="comma-separated tiny families (default: all)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda or "none (CPU build)"))
        return 0
    from finer.testing import TINY_FAMILIES

    families = args.families.split(",") if args.families else list(TINY_FAMILIES)
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    print(f"gpu_check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"steps {args.steps}, batch {args.batch}, {args.new_tokens} new tokens per row\n")
    print(HEADER, flush=True)
    rows = []
    for family in families:
        row = guarded(
            family,
            "bf16 LoRA",
            lambda family=family: check_family(
                family,
                device=device,
                dtype=torch.bfloat16,
                steps=args.steps,
                batch=args.batch,
                new_tokens=args.new_tokens,
            ),
        )
        rows.append(row)
        print(row.markdown(), flush=True)
    for check, run in (("4-bit QLoRA", check_qlora), ("Liger LoRA", check_liger)):
        family = "llava" if check.startswith("4-bit") else "qwen2_5_vl"
        row = guarded(family, check, lambda run=run: run(device, args.steps, args.batch))
        rows.append(row)
        print(row.markdown(), flush=True)
    failed = [row for row in rows if row.note.startswith("FAILED")]
    print(f"\ngpu_check: {len(rows)} checks, {len(failed)} failed")
    return 1 if failed else 0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")


if __name__ == "__main__":
    sys.exit(main())
