"""A full disk (issue 23): one line naming the folder, nothing torn or half-written, and the rerun resumes."""

import errno
import os

import pytest

import kvbench
from kvbench.errors import KVBenchError
from kvbench.runner import folder as folder_module
from kvbench.runner.folder import atomic_write_text

SMALL = {"task.num_samples": 5, "task.context_tokens": 300}


def full_disk_after(monkeypatch, ok_calls: int, path_part: str):
    """os.fsync of a file whose path contains `path_part` fails with ENOSPC after `ok_calls` successes."""
    real, calls = os.fsync, []

    def fsync(fd):
        if path_part in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) > ok_calls:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(folder_module.os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_a_full_disk_mid_run_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    whole = kvbench.evaluate(model="tiny", method="h2o", budget=32, results=tmp_path / "whole", **SMALL)
    full_disk_after(monkeypatch, 2, "predictions.jsonl")
    with pytest.raises(KVBenchError) as err:
        kvbench.evaluate(model="tiny", method="h2o", budget=32, results=tmp_path / "r", **SMALL)
    message = str(err.value)
    assert "\n" not in message and message.startswith("no space left on the disk holding ")
    run = next((tmp_path / "r" / "runs").glob("*/*/*/*"))
    assert str(run) in message and "rerun the same command" in message
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.endswith("\n") for line in lines)  # the third record cut back, not torn
    assert not (run / "scores.json").exists()
    monkeypatch.undo()
    again = kvbench.evaluate(model="tiny", method="h2o", budget=32, results=tmp_path / "r", **SMALL)
    strip = lambda r: {k: v for k, v in r.items() if "seconds" not in k}  # noqa: E731
    assert [strip(r) for r in again.records] == [strip(r) for r in whole.records]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_a_summary_file_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "scores.json"
    path.write_text("old\n")
    full_disk_after(monkeypatch, 0, "scores.json")
    with pytest.raises(KVBenchError, match=f"no space left on the disk holding {tmp_path}"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_a_plot_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from kvbench.report import plots
    from kvbench.report.runs import collect, find_runs
    from tests.helpers import fake_run

    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 80.0}, 64)
    out = tmp_path / "plots" / "p.png"
    out.parent.mkdir()
    out.write_bytes(b"old")

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots.os, "replace", replace)
    with pytest.raises(KVBenchError, match="no space left on the disk holding .*plots"):
        plots.budget_vs_score(collect(find_runs(tmp_path)), out)
    assert out.read_bytes() == b"old" and [p.name for p in out.parent.iterdir()] == ["p.png"]
