"""LongBench data errors: each bad file stops with one line naming the file, the line and the fix."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.errors import KVBenchError
from kvbench.tasks import build
from tests.helpers import LONGBENCH_FIXTURES as FIXTURES

ROOT = Path(__file__).resolve().parents[2]


def good_rows(stem="hotpotqa"):
    return [json.loads(x) for x in (FIXTURES / f"{stem}.jsonl").read_text().splitlines()]


def write(folder, stem, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def samples(folder, subset="hotpotqa", variant="standard"):
    return build({"name": "longbench", "data_dir": str(folder), "subsets": [subset], "variant": variant,
                  "download": False}).samples()


def bad(rows, index, **change):
    rows = [dict(r) for r in rows]
    rows[index].update(change)
    for key, value in change.items():
        if value is KeyError:
            del rows[index][key]
    return [json.dumps(r) for r in rows]


@pytest.mark.parametrize("make,subset,variant,message", [
    (lambda: [json.dumps(good_rows()[0]), '{"input": "x", "context": '], "hotpotqa", "standard",
     r"hotpotqa.jsonl:2: not valid JSON .*prepare_longbench.py"),
    (lambda: bad(good_rows(), 1, context=KeyError), "hotpotqa", "standard",
     r"hotpotqa.jsonl:2: sample lacks the field\(s\) context"),
    (lambda: bad(good_rows(), 0, answers="Paris"), "hotpotqa", "standard",
     r"hotpotqa.jsonl:1: `answers` must be a list of strings, got a string; write it as \[\"...\"\]"),
    (lambda: bad(good_rows("hotpotqa_e"), 1, length=KeyError), "hotpotqa", "e",
     r"hotpotqa_e.jsonl:2: LongBench-E sample lacks `length`"),
    (lambda: [], "hotpotqa", "standard", r"hotpotqa.jsonl: no samples \(empty file\).*task.subsets"),
    (lambda: ["", "   "], "hotpotqa", "standard", r"hotpotqa.jsonl: no samples"),
    (lambda: bad(good_rows("trec"), 0, all_classes=None), "trec", "standard",
     r"trec.jsonl:1: classification sample lacks the list `all_classes`"),
    (lambda: ["[1, 2]"], "hotpotqa", "standard", r"hotpotqa.jsonl:1: a sample must be a JSON object"),
])
def test_bad_data_is_one_line_naming_file_line_and_fix(tmp_path, make, subset, variant, message):
    stem = f"{subset}_e" if variant == "e" else subset
    folder = write(tmp_path / "lb", stem, make())
    with pytest.raises(KVBenchError, match=message) as err:
        samples(folder, subset, variant)
    assert "\n" not in str(err.value) and str(folder / f"{stem}.jsonl") in str(err.value)


def test_bad_parquet_row_is_named_too(tmp_path):
    import pandas as pd

    rows = good_rows()
    rows[1]["context"] = None
    pd.DataFrame(rows).to_parquet(tmp_path / "hotpotqa.parquet")
    with pytest.raises(KVBenchError, match=r"hotpotqa.parquet row:2: sample lacks the field\(s\) context"):
        samples(tmp_path)


def test_good_fixtures_pass_unchanged():
    assert len(samples(FIXTURES)) == len(good_rows())


def test_cli_prints_one_line_and_exits_2(tmp_path):
    folder = write(tmp_path / "lb", "hotpotqa", [])
    done = subprocess.run(
        [sys.executable, "-m", "kvbench", "run", "logger=none", f"paths.results={tmp_path / 'results'}", "task=longbench",
         f"task.data_dir={folder}", "task.subsets=[hotpotqa]", "task.download=false", "model=tiny-random",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "hotpotqa.jsonl: no samples" in lines[0]
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").rglob("scores.json"))
