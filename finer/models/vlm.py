"""What the steps that show images to a VLM share: image encoding, the refusal test, and a local model.

The exemplar extractor (`finer build --extractor vlm`) and per-image grounding (`finer ground`) both send
images as bounded-size base64 JPEG data URLs inside chat messages, so a reply's cache key covers the exact
pixels sent, and both treat an endpoint's 400 about images as "this model takes no images". `HFChat` puts
a local transformers VLM behind the same `reply()` as `finer.models.client.ChatClient`, gathering
concurrent calls
into left-padded batches, so every step has one code path whichever backend answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from PIL import Image

from finer.errors import FinerError, one_line
from finer.models.client import Reply, Usage
from finer.models.images import decode_data_url

__all__ = ["HFChat"]


def _hf_conversation(messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """Chat-completions messages as a transformers chat (image slots in place) and their images, in order."""
    conversation, images = [], []
    for message in messages:
        content = message["content"]
        blocks: list[dict[str, Any]] = []
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if block.get("type") == "image_url":
                images.append(decode_data_url(block["image_url"]["url"]))
                blocks.append({"type": "image"})
            else:
                blocks.append({"type": "text", "text": block.get("text", "")})
        conversation.append({"role": message["role"], "content": blocks})
    return conversation, images


class HFChat:
    """A local transformers VLM answering `reply()` calls in batches of up to `batch_size`, left-padded.

    Calls made concurrently (the steps start one per concept or image, bounded by their own worker count)
    are gathered for up to `linger_s`, then generated together in a worker thread while the event loop
    keeps collecting the next batch. Greedy, so a batch's make-up never changes an answer. Replies are not
    cached: a local folder's weights can change under the same name; resumable steps keep their own record.
    """

    #: Local generation takes no JSON schema here: replies go through the same tolerant parsers.
    structured_output = "text"

    def __init__(
        self,
        model: str,
        *,
        usage: Usage | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        linger_s: float = 0.05,
    ) -> None:
        from finer.models.backends import HFBackend

        if batch_size < 1:
            raise FinerError("--concurrency (the batch size of --backend hf) must be at least 1")
        self.model = model
        self.base_url = f"hf:{model}"
        self.usage = usage if usage is not None else Usage()
        self.batch_size = batch_size
        self.linger_s = linger_s
        self._backend = HFBackend(model, batch_size=batch_size, max_new_tokens=max_new_tokens)
        self._queue: list[tuple[list[dict], list[Image.Image], asyncio.Future[Reply]]] = []
        self._wake: asyncio.Event | None = None
        self._server: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HFChat:
        self._wake = asyncio.Event()
        self._server = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.cancel()
            await asyncio.gather(self._server, return_exceptions=True)

    async def reply(
        self,
        messages: list[dict],
        *,
        template_sha256: str,
        schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> Reply:
        """The model's reply to `messages` (chat-completions shape, images as data URLs); finish reason
        "length" when generation stopped at `max_new_tokens` (fixed for the model: `max_tokens` is not
        applied locally)."""
        assert self._wake is not None, "use `async with HFChat(...)`"
        conversation, images = _hf_conversation(messages)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._queue.append((conversation, images, future))
        self._wake.set()
        return await future

    async def _serve(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            if len(self._queue) < self.batch_size:
                await asyncio.sleep(self.linger_s)  # let the other callers of this round join the batch
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
            if not self._queue:
                self._wake.clear()
            batch = [item for item in batch if not item[2].done()]  # a cancelled caller needs no answer
            # One generate call per image count: processors want every prompt of a batch alike.
            for count in sorted({len(images) for _, images, _ in batch}):
                group = [item for item in batch if len(item[1]) == count]
                try:
                    replies = await asyncio.to_thread(self._generate, group)
                except Exception as err:  # noqa: BLE001 - any generation error stops the callers, one line
                    error = FinerError(f"--model {self.model}: local generation failed ({one_line(err)})")
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, _, future), reply in zip(group, replies, strict=True):
                    if not future.done():
                        future.set_result(reply)

    def _generate(
        self, group: list[tuple[list[dict], list[Image.Image], asyncio.Future[Reply]]]
    ) -> list[Reply]:
        """One left-padded batch through `HFBackend.generate` (in a worker thread); records tokens, free."""
        answers = self._backend.generate(
            [conversation for conversation, _, _ in group], [i for _, i, _ in group]
        )
        self.usage.calls += len(group)
        self.usage.prompt_tokens += sum(a.prompt_tokens for a in answers)
        self.usage.completion_tokens += sum(a.new_tokens for a in answers)
        return [Reply(a.text, "length" if a.truncated else "stop") for a in answers]
