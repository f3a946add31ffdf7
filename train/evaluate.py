"""A quick check that a fine-tuned model really learned: generate on a split, score the fine level.

The questions are the training template's, and the model's own answers are fed forward: in the FINER format it
first names the group, then lists attributes of *its* group, then names the species; in the direct format the
question names only the superordinate. Nothing of the gold coarse or fine label reaches the prompt, so the
accuracy measures what the model reads from the image. Scoring is `finer.scoring.score` at level fine (and
coarse for the first FINER turn). The evaluation harness can take this path over.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from finer.prompts import render
from finer.scoring import extract_answer, score

__all__ = ["evaluate_fine", "generate"]


@torch.no_grad()
def generate(
    model: Any, processor: Any, conversations: Sequence[list[dict]], max_new_tokens: int
) -> list[str]:
    """Greedy continuations of a batch of conversations (images inside their content blocks)."""
    inputs = processor.apply_chat_template(
        list(conversations),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    ).to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _user_turns(fmt: str, superordinate: str, coarse: str, prompts_dir: str | Path | None) -> list[dict]:
    """The user messages of the training conversation, asked about `coarse` (the model's own group)."""
    name = "train_finer" if fmt == "finer" else "train_direct"
    extra = {"attributes": []} if fmt == "finer" else {}
    messages = render(
        name, prompts_dir=prompts_dir, superordinate=superordinate, coarse=coarse, fine="", **extra
    )
    return [m for m in messages if m["role"] == "user"]


def _with_image(message: dict, image: Any) -> dict:
    content = [
        {**block, "image": image} if block["type"] == "image" else block for block in message["content"]
    ]
    return {**message, "content": content}


def evaluate_fine(
    model: Any,
    processor: Any,
    ds: datasets.Dataset,
    fmt: str,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    prompts_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-level modified-EM accuracy of `model` on `ds` (FINER format: the first turn's group too)."""
    was_training = model.training
    model.eval()
    fine_hits, coarse_hits, samples = [], [], []
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]  # a slice, so that a dataset transform (cropping) applies
        supers, images = rows["superordinate"], [im.convert("RGB") for im in rows["image"]]
        answers: list[list[str]] = [[] for _ in supers]
        for _ in range(3 if fmt == "finer" else 1):
            batch = []
            for sup, image, said in zip(supers, images, answers, strict=True):
                group = (extract_answer(said[0]) if said else "") or sup
                users = _user_turns(fmt, sup, group, prompts_dir)
                conversation = [_with_image(users[0], image)]
                for answer, user in zip(said, users[1:], strict=False):
                    conversation += [
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                        user,
                    ]
                batch.append(conversation)
            for said, text in zip(answers, generate(model, processor, batch, max_new_tokens), strict=True):
                said.append(text.strip())
        for i, said in enumerate(answers):
            labels = (rows["superordinate"][i], rows["coarse"][i], rows["fine"][i])
            fine_hits.append(score(said[-1], "fine", *labels).em)
            if fmt == "finer":
                coarse_hits.append(score(said[0], "coarse", *labels).em)
            if len(samples) < 4:
                samples.append({"fine": labels[2][0], "answers": said})
    model.train(was_training)
    n = len(fine_hits)
    result: dict[str, Any] = {
        "images": n,
        "fine_accuracy": sum(fine_hits) / n if n else 0.0,
        "chance": 1 / len({tuple(f) for f in ds["fine"]}) if n else 0.0,
        "samples": samples,
    }
    if coarse_hits:
        result["coarse_accuracy"] = sum(coarse_hits) / n
    return result
