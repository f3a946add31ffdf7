"""The append-only log `finer eval` and `finer ground` resume from: a torn last line is skipped on reading
and cut before the next append, whatever its length."""

from __future__ import annotations

from pathlib import Path

from finer.appendlog import AppendLog


def test_a_torn_last_line_is_skipped_then_cut(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    torn = '{"key": "b", "text": "' + "x" * 200_000  # longer than one 64 KiB chunk
    path.write_text('{"key": "a"}\nnot json\n[1, 2]\n' + torn)
    log = AppendLog(path)
    assert list(log.records()) == [{"key": "a"}]
    log.write({"key": "c"})
    log.close()
    assert path.read_text() == '{"key": "a"}\nnot json\n[1, 2]\n{"key": "c"}\n'
    assert [r["key"] for r in AppendLog(path).records()] == ["a", "c"]


def test_a_file_without_a_whole_line_starts_over_and_a_missing_one_is_created(tmp_path: Path) -> None:
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"key": "a"')
    AppendLog(torn).write({"key": "b"})
    assert torn.read_text() == '{"key": "b"}\n'
    fresh = AppendLog(tmp_path / "new.jsonl")
    assert list(fresh.records()) == []
    fresh.write({"key": "é"})
    fresh.close()
    assert (tmp_path / "new.jsonl").read_text(encoding="utf-8") == '{"key": "é"}\n'
