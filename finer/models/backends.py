"""Where evaluation answers come from: a local transformers model, or an OpenAI-compatible endpoint.

Both backends take the same `Task`s (`finer.eval.tasks`) and hand every finished one to a `Sink` the moment
its answer exists, so the caller can append it to disk at once and a crash loses at most what was in flight.
A task whose image cannot be read (a file deleted or truncated since the build, a decompression bomb, a box
of no size) goes to the sink as skipped, with the reason: one bad image never ends a run.
In multi-turn modes (attribute seeking, the `finer` replay of the training conversation) each later turn is
built from the model's own earlier answers; tasks that share a first turn (the same image and question at
several levels) ask it once, so every level sees the same first answer.

- `HFBackend`: `AutoModelForImageTextToText` with its processor, batched generation with left padding
  (greedy by default, so batch size never changes an answer), bf16 on a GPU and fp32 on a CPU.
- `OpenAIBackend`: the shared `finer.models.client.ChatClient` (its retries honour `Retry-After`), images as
base64
  JPEG data URLs, two workers per endpoint slot (`workers_for`), so the next image is encoded while a call
  is in flight; at most `concurrency` calls per endpoint are.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from PIL import Image

from finer.cache import Cache
from finer.errors import FinerError
from finer.eval.tasks import Task
from finer.models.images import UNREADABLE, image_data_url, unreadable_reason
from finer.models.loading import load_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

    from finer.models.client import ChatClient, Usage

__all__ = [
    "Backend",
    "Generation",
    "HFBackend",
    "OpenAIBackend",
    "Sink",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Generation:
    """One answer; ``truncated`` when it stopped at the token limit instead of ending by itself.

    A local model also counts its prompt tokens (padding excluded) and the new tokens it generated.
    """

    text: str
    truncated: bool = False
    prompt_tokens: int = 0
    new_tokens: int = 0


class Sink(Protocol):
    """Receives each task as soon as it is finished (or has failed for good, or cannot be asked because
    its image is unreadable)."""

    def done(self, task: Task, turns: list[Generation]) -> None: ...

    def failed(self, task: Task, reason: str) -> None: ...

    def skipped(self, task: Task, reason: str) -> None: ...


class Backend(Protocol):
    """Answers tasks; ``run`` returns when every task went to the sink."""

    def run(self, tasks: Iterable[Task], sink: Sink) -> None: ...


def _image_key(task: Task) -> str:
    """Tasks about the same image (its levels) share the decoded or encoded image."""
    return f"{task.record['source']}\0{task.record['image_id']}"


def _first_turn_key(task: Task) -> str:
    """Tasks about the same image with the same first question share its answer."""
    return f"{_image_key(task)}\0{json.dumps(task.first, sort_keys=True)}"


def _picture(task: Task) -> Image.Image | None:
    """The task's image decoded whole now, so that a truncated file fails here (one task), not in a batch."""
    if task.image is None:
        return None
    image = task.image().convert("RGB")
    if not (image.width and image.height):
        raise ValueError(f"empty image ({image.width}x{image.height}: a box of no size?)")
    return image


# --- local models -----------------------------------------------------------------------------------


class HFBackend:
    """A transformers model answering in batches of ``batch_size`` (left-padded, one image each)."""

    def __init__(
        self,
        model: str | PreTrainedModel,
        adapter: str | None = None,
        *,
        processor: ProcessorMixin | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> None:
        """``model`` is an id or path to load (with ``adapter``), or a model already in memory with its
        ``processor`` (the fine-tuning run's own evaluation)."""
        import torch
        from transformers import GenerationConfig

        if isinstance(model, str):
            self.model, self.processor = load_model(model, adapter)
        elif processor is None:
            raise ValueError("a model in memory needs its processor")
        else:
            self.model, self.processor = model, processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        tokenizer = self.processor.tokenizer
        # Right padding would put pad tokens between a prompt and its answer.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        defaults = self.model.generation_config
        eos = defaults.eos_token_id if defaults.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # A fresh config: a checkpoint's sampling defaults (top_p, top_k, ...) must not leak into greedy runs.
        self.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=defaults.bos_token_id,
        )
        torch.manual_seed(seed)  # for --temperature > 0

    def run(self, tasks: Iterable[Task], sink: Sink) -> None:
        """Answer ``tasks`` a batch at a time: the batch's first turns, then each later turn in step.

        First answers are kept for one batch more, so that the levels of an image split over two
        batches still share one first turn. A task whose image cannot be read is skipped; a batch whose
        images the processor refuses (one too small to tell its channels, say) is asked a task at a time,
        so that only the task at fault is skipped.
        """
        previous: dict[str, Generation] = {}
        for batch in _batches(tasks, self.batch_size):
            pictures: dict[str, Image.Image | None] = {}
            broken: dict[str, str] = {}
            for task in batch:
                key = _image_key(task)
                if key not in pictures and key not in broken:
                    try:
                        pictures[key] = _picture(task)
                    except UNREADABLE as err:
                        broken[key] = unreadable_reason(err)
            for task in batch:
                if _image_key(task) in broken:
                    sink.skipped(task, broken[_image_key(task)])
            batch = [task for task in batch if _image_key(task) not in broken]
            if not batch:
                continue
            try:
                previous = self._answer(batch, pictures, previous, sink)
            except ValueError:
                if not any(pictures.values()):
                    raise
                firsts: dict[str, Generation] = {}
                for task in batch:
                    try:
                        firsts.update(self._answer([task], pictures, previous, sink))
                    except ValueError as err:
                        sink.skipped(task, f"the processor refused the image ({unreadable_reason(err)})")
                previous = firsts

    def _answer(
        self,
        batch: list[Task],
        pictures: dict[str, Image.Image | None],
        previous: dict[str, Generation],
        sink: Sink,
    ) -> dict[str, Generation]:
        """Answer one batch of tasks (their images in ``pictures``) into ``sink``; returns its first turns."""
        images = {id(task): _listed(pictures[_image_key(task)]) for task in batch}
        keys = {id(task): _first_turn_key(task) for task in batch}
        ask = {keys[id(task)]: task for task in batch if keys[id(task)] not in previous}
        firsts = {key: previous[key] for key in keys.values() if key in previous}
        if ask:
            answers = self.generate([t.first for t in ask.values()], [images[id(t)] for t in ask.values()])
            firsts.update(zip(ask, answers, strict=True))
        turns = {id(task): [firsts[keys[id(task)]]] for task in batch}
        for step in range(max(len(task.followups) for task in batch)):
            follow = [task for task in batch if len(task.followups) > step]
            answers = self.generate(
                [task.followups[step]([t.text for t in turns[id(task)]]) for task in follow],
                [images[id(task)] for task in follow],
            )
            for task, answer in zip(follow, answers, strict=True):
                turns[id(task)].append(answer)
        for task in batch:
            sink.done(task, turns[id(task)])
        return firsts

    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> list[Generation]:
        """Answer one batch of conversations, each with its own images (all have some, or none has).

        The one local-generation path: evaluation, grounding and the VLM extractor (`finer.models.vlm`)
        all come here, so the chat template, the BOS guard and the padding side are decided once.
        """
        import torch

        texts = [
            self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in conversations
        ]
        pictures = [[image.convert("RGB") for image in own] for own in images if own]
        if pictures and len(pictures) != len(texts):
            raise ValueError("a batch mixes conversations with and without an image")
        # A template that writes the BOS token itself must not get a second one from the tokenizer (what
        # transformers' own `apply_chat_template(tokenize=True)` and TRL's collators decide the same way).
        bos = self.processor.tokenizer.bos_token
        inputs = self.processor(
            text=texts,
            images=pictures or None,
            padding=True,
            return_tensors="pt",
            add_special_tokens=not (bos and texts[0].startswith(bos)),
        )
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=self.generation_config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        pad = self.generation_config.pad_token_id
        return [
            Generation(
                text.strip(),
                self._truncated(tokens),
                prompt_tokens=int(mask.sum()),
                new_tokens=int((tokens != pad).sum()) if pad is not None else len(tokens),
            )
            for text, tokens, mask in zip(answers, new_tokens, inputs["attention_mask"], strict=True)
        ]

    def _truncated(self, tokens: torch.Tensor) -> bool:
        """Used every allowed token without producing an end-of-sequence token."""
        return len(tokens) >= self.max_new_tokens and not self.eos_ids.intersection(tokens.tolist())


class _One:
    """A `Sink` for a single task."""

    def __init__(self) -> None:
        self.turns: list[Generation] = []
        self.failure = ""

    def done(self, task: Task, turns: list[Generation]) -> None:
        self.turns = turns

    def failed(self, task: Task, reason: str) -> None:
        self.failure = reason

    def skipped(self, task: Task, reason: str) -> None:
        self.failure = f"unreadable image ({reason})"


def answer(backend: Backend, task: Task) -> list[Generation]:
    """Every turn of `backend`'s answer to one task (`finer predict`); a failed call is a `FinerError`."""
    sink = _One()
    backend.run([task], sink)
    if not sink.turns:
        raise FinerError(f"no answer: {sink.failure or 'the backend returned nothing'}")
    return sink.turns


def _listed(image: Image.Image | None) -> list[Image.Image]:
    return [image] if image is not None else []


def _batches(items: Iterable[Task], size: int) -> Iterator[list[Task]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# --- OpenAI-compatible endpoints --------------------------------------------------------------------


def _data_url(task: Task) -> str:
    """Decode and encode in a worker thread: PIL releases the GIL, the event loop keeps serving replies."""
    return image_data_url(_picture(task))  # type: ignore[arg-type]


#: Finished shared results (encoded images, first turns) kept per worker.
_RECENT = 4


class _Shared:
    """Results that concurrent tasks share, computed once: while one task computes, the others await it.

    Only the last ``size`` keys are kept, since the tasks about one image are adjacent. A failure is
    forgotten, so the next task that needs the result tries again.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._futures: dict[str, asyncio.Future[Any]] = {}

    async def get(self, key: str, make: Callable[[], Awaitable[T]]) -> T:
        if key in self._futures:
            return await asyncio.shield(self._futures[key])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[key] = future
        if len(self._futures) > self.size:
            del self._futures[next(iter(self._futures))]
        try:
            future.set_result(await make())
        except Exception as err:
            if self._futures.get(key) is future:
                del self._futures[key]
            future.set_exception(err)
            future.exception()  # retrieved, so a future nobody else awaited does not warn
            raise
        except BaseException:
            future.cancel()
            raise
        return future.result()


class _NoCache(Cache):
    """Evaluation keeps its own record (predictions.jsonl); without a reply folder (`--cache`, `--batch`)
    caching each reply again would only cost disk."""

    def get(self, namespace: str, key: str) -> Any | None:
        return None

    def put(self, namespace: str, key: str, value: Any) -> None:
        return None


class OpenAIBackend:
    """An OpenAI-compatible endpoint answering up to ``concurrency`` tasks at once."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        concurrency: int = 16,
        temperature: float = 0.0,
        max_new_tokens: int | None = None,
        template_sha256: str = "",
        max_retries: int | None = None,
        timeout: float | None = None,
        cache: Path | None = None,
    ) -> None:
        """``max_new_tokens`` goes out as ``max_tokens`` (dropped for the run if the endpoint refuses it); a
        reply cut at a limit is flagged either way. ``max_retries`` and ``timeout`` (seconds per request)
        override the shared client's defaults. ``cache``: a folder where replies are read before asking and
        stored when they arrive (where `--batch` leaves its answers for the run); None keeps none."""
        from finer.models.client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, Usage, endpoint_configured

        if not endpoint_configured(base_url):
            raise FinerError("--backend openai needs an endpoint: pass --base-url or set OPENAI_API_KEY")
        if concurrency < 1:
            raise FinerError("--concurrency must be at least 1")
        self.model = model
        self.base_url = base_url
        self.concurrency = concurrency
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.template_sha256 = template_sha256
        self.max_retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        self.cache = cache
        self.usage: Usage = Usage()

    def run(self, tasks: Iterable[Task], sink: Sink) -> None:
        from finer.models.client import run_sync

        run_sync(self._run(iter(tasks), sink))

    async def _run(self, tasks: Iterator[Task], sink: Sink) -> None:
        from finer.models.client import ChatClient, run_workers, workers_for

        async with ChatClient(
            self.model,
            self.base_url,
            cache=_NoCache() if self.cache is None else Cache(self.cache),
            usage=self.usage,
            concurrency=self.concurrency,
            temperature=self.temperature,
            max_retries=self.max_retries,
            timeout=self.timeout,
        ) as chat:
            workers = workers_for(chat, batch=self.concurrency)
            shared = _Shared(_RECENT * workers)
            await run_workers(partial(self._worker, chat, tasks, shared, sink), workers)

    async def _worker(self, chat: ChatClient, tasks: Iterator[Task], shared: _Shared, sink: Sink) -> None:
        """Take the next task until none is left (the iterator is shared; the event loop is one thread).

        The levels of one image share its encoded image and, where they ask the same first question
        (multi-turn modes), its first turn.
        """
        from finer.models.client import CallFailed

        for task in tasks:
            try:
                url = (
                    await shared.get(_image_key(task), partial(asyncio.to_thread, _data_url, task))
                    if task.image
                    else None
                )
            except UNREADABLE as err:
                sink.skipped(task, unreadable_reason(err))
                continue
            try:
                first = partial(self._ask, chat, task.first, url)
                turns = [await shared.get(_first_turn_key(task), first)]
                for followup in task.followups:
                    turns.append(await self._ask(chat, followup([t.text for t in turns]), url))
            except CallFailed as err:
                sink.failed(task, str(err))
                continue
            sink.done(task, turns)

    async def _ask(self, chat: ChatClient, messages: list[dict], url: str | None) -> Generation:
        from finer.models.client import CallFailed, openai_messages, refuses_images

        try:
            reply = await chat.reply(
                openai_messages(messages, [url] if url else []),
                template_sha256=self.template_sha256,
                max_tokens=self.max_new_tokens,
            )
        except CallFailed as err:
            if url and refuses_images(err):
                raise FinerError(
                    f"{chat.base_url} refused an image for model {self.model!r} ({err}); "
                    "evaluate a vision model, or use --mode probe (text only)"
                ) from None
            raise
        return Generation(reply.text.strip(), reply.truncated)
