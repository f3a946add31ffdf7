"""The OpenAI files and Batch API, faked for tests (`FakeOpenAI(batches=FakeBatches(...))`).

`POST /v1/files` (multipart, purpose "batch"), `GET /v1/files/{id}/content`, `POST /v1/batches`,
`GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`. A batch stays `in_progress` for `delay` seconds,
then its requests are answered by the chat server's own responder (so a batch reply is what the same call
would have got synchronously) and it turns `completed`, or `expired` when any item's `fate` is "expired".
`fate(custom_id, body)` scripts each item: "ok", "failed" (a 500 in the error file) or "expired" (unfinished
at the 24 h window: `batch_expired` in the error file). Output and error files are JSONL, as OpenAI
writes them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

Respond = Callable[[dict[str, Any]], tuple[int, dict[str, str], dict[str, Any], float]]
Reply = tuple[int, bytes, str]  # status, body, content type


class FakeBatches:
    """Files and batches held in memory; `created` lists every batch created (re-attach tests count them)."""

    def __init__(self, *, delay: float = 0.0, fate: Callable[[str, dict], str] | None = None) -> None:
        self.delay = delay
        self.fate = fate or (lambda custom_id, body: "ok")
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.respond: Respond | None = None  # the chat server's answer to one request, set by FakeOpenAI
        self._lock = threading.Lock()

    def handle(self, method: str, path: str, content_type: str, raw: bytes) -> Reply | None:
        """The reply to a files/batches request, or None when the path is none of theirs."""
        parts = path.strip("/").split("/")[1:]  # without "v1"
        if method == "POST" and parts == ["files"]:
            return self._upload(content_type, raw)
        if method == "GET" and len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            data = self.files.get(parts[1])
            return (200, data, "application/octet-stream") if data is not None else _missing(path)
        if method == "POST" and parts == ["batches"]:
            return self._create(json.loads(raw))
        if parts[:1] == ["batches"] and len(parts) >= 2:
            batch = self.batches.get(parts[1])
            if batch is None:
                return _missing(path)
            if method == "POST" and parts[2:] == ["cancel"]:
                batch["status"] = "cancelled"
            return _json(200, self._advance(batch))
        return None

    def _upload(self, content_type: str, raw: bytes) -> Reply:
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        data = fields["file"].get_payload(decode=True)
        with self._lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = data
        return _json(200, _file(file_id, data, str(fields["purpose"].get_content()).strip()))

    def _create(self, body: dict[str, Any]) -> Reply:
        lines = [json.loads(line) for line in self.files[body["input_file_id"]].decode().splitlines() if line]
        with self._lock:
            batch_id = f"batch_{len(self.batches)}"
            self.created.append(batch_id)
            self.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": "in_progress",
                "created_at": int(time.time()),
                "output_file_id": None,
                "error_file_id": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "_lines": lines,
                "_ready_at": time.monotonic() + self.delay,
            }
        return _json(200, self._public(self.batches[batch_id]))

    def _advance(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as a retrieve sees it, finishing it once its delay has passed."""
        with self._lock:
            if batch["status"] == "in_progress" and time.monotonic() >= batch["_ready_at"]:
                self._finish(batch)
        return self._public(batch)

    def _finish(self, batch: dict[str, Any]) -> None:
        output, errors = [], []
        for n, line in enumerate(batch["_lines"]):
            fate = self.fate(line["custom_id"], line["body"])
            entry = {"id": f"batch_req_{n}", "custom_id": line["custom_id"], "response": None, "error": None}
            if fate == "expired":
                entry["error"] = {"code": "batch_expired", "message": "not finished within the window"}
                errors.append(entry)
                continue
            status, _, body, _ = self.respond(line["body"]) if fate == "ok" else (500, {}, {"error": {}}, 0)
            entry["response"] = {"status_code": status, "request_id": f"req_{n}", "body": body}
            (output if status == 200 else errors).append(entry)
        batch["request_counts"].update(completed=len(output), failed=len(errors))
        for name, lines in (("output_file_id", output), ("error_file_id", errors)):
            if lines:
                file_id = f"file-{len(self.files)}"
                self.files[file_id] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                batch[name] = file_id
        expired = any(e["error"] and e["error"]["code"] == "batch_expired" for e in errors)
        batch["status"] = "expired" if expired else "completed"

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}


def _file(file_id: str, data: bytes, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": int(time.time()),
        "filename": "batch.jsonl",
        "purpose": purpose,
        "status": "processed",
    }


def _json(status: int, body: dict[str, Any]) -> Reply:
    return status, json.dumps(body).encode(), "application/json"


def _missing(path: str) -> Reply:
    return _json(404, {"error": {"message": f"no such object: {path}"}})
