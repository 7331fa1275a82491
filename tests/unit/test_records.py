"""Run folders keep every good record, write files collaborators can read, and time sessions exactly."""

import json
import logging
import os
import stat

import pytest

from kvbench.runner.folder import RunFolder, atomic_write_text
from kvbench.runner.provenance import session_wall, timing_meta


def folder_with(tmp_path, n=200):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    for i in range(n):
        folder.append({"id": f"s-{i}", "score": i % 2})
    return folder


def test_a_corrupt_middle_line_drops_only_that_line(tmp_path, caplog):
    folder = folder_with(tmp_path)
    lines = folder.predictions_path.read_text().splitlines(keepends=True)
    lines[9] = '{"id": "s-9", "sco\x00 garbled\n'  # line 10 of 200
    folder.predictions_path.write_text("".join(lines))
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        records = folder.records()
    assert len(records) == 199 and "s-9" not in {r["id"] for r in records}
    assert [r["id"] for r in records] == [f"s-{i}" for i in range(200) if i != 9]
    assert "dropped 1 corrupt line" in caplog.text and "line 10" in caplog.text
    assert len(folder.predictions_path.read_text().splitlines()) == 199  # the file keeps the 199, not 9
    assert folder.records() == records  # and reads clean afterwards
    folder.append({"id": "s-9", "score": 1})  # the sample runs again and is appended
    assert len(folder.records()) == 200


def test_a_half_written_last_line_is_cut_and_appends_stay_lines(tmp_path):
    folder = folder_with(tmp_path, 5)
    with open(folder.predictions_path, "a") as f:
        f.write('{"id": "s-5", "pre')
    assert [r["id"] for r in folder.records()] == [f"s-{i}" for i in range(5)]
    folder.append({"id": "s-5"})
    assert [json.loads(line)["id"] for line in folder.predictions_path.read_text().splitlines()][-1] == "s-5"


def test_lines_that_are_json_but_not_records_are_dropped(tmp_path):
    folder = folder_with(tmp_path, 3)
    with open(folder.predictions_path, "a") as f:
        f.write("[1, 2]\n\n42\n")
    folder.append({"id": "s-3"})
    assert [r["id"] for r in folder.records()] == ["s-0", "s-1", "s-2", "s-3"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "scores.json", "{}\n")
        folder = RunFolder(tmp_path / "run")
        folder.path.mkdir()
        folder.append({"id": "a"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "scores.json").stat().st_mode) == mode
    assert stat.S_IMODE(folder.predictions_path.stat().st_mode) == mode


def test_timing_splits_prefill_and_decode_and_sums_sessions():
    records = [  # two sessions' records: each holds its own time
        {"n_prompt": 100, "n_new": 10, "seconds": 2.0, "prefill_seconds": 0.5, "wall_seconds": 2.5},
        {"n_prompt": 300, "n_new": 30, "seconds": 4.0, "prefill_seconds": 1.5, "wall_seconds": 4.5},
    ]
    t = timing_meta(records)
    assert t["generation_seconds"] == 6.0 and t["prefill_seconds"] == 2.0 and t["decode_seconds"] == 4.0
    assert t["prefill_tokens_per_s"] == 200.0  # 400 prompt tokens / 2 s
    assert t["new_tokens_per_s"] == 10.0  # 40 new tokens / 4 s of decoding, never over the prefill's time
    assert t["tokens_per_s"] == pytest.approx(440 / 6, abs=0.01)
    assert session_wall(records, 9.0) == {"wall_seconds": 7.0, "wall_seconds_this_session": 9.0}
    streamed = timing_meta([{"n_prompt": 50, "n_new": 0, "seconds": 1.0}])  # perplexity: no prefill/decode split
    assert streamed["tokens_per_s"] == 50.0 and streamed["new_tokens_per_s"] is None
