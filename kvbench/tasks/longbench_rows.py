"""Reading and checking LongBench data files: one clear line per problem, naming the file, the line and the fix.

A malformed JSON line, a missing field, `answers` that is not a list, a LongBench-E
sample without `length`, or a file with no sample stops the run (`KVBenchError`)
before anything is generated: no traceback, and no task that silently drops out
of the average.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvbench.errors import KVBenchError

REQUIRED = ("_id", "context", "input", "answers")  # what the prompt templates and the scoring read
REFETCH = "re-download it with `python scripts/prepare_longbench.py --out DIR`, or fix the line"


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a jsonl file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise KVBenchError(f"{path}:{number}: not valid JSON ({err.msg}); {REFETCH}") from None
            if not isinstance(row, dict):
                raise KVBenchError(f"{path}:{number}: a sample must be a JSON object, got {type(row).__name__}; {REFETCH}")
            rows.append((number, row))
    return rows


def check_rows(rows: list[tuple[int, dict]], source: str, e_file: bool, classification: bool) -> list[dict]:
    """The rows of one task file, checked; `source` names the file, line numbers are 1-based."""
    if not rows:
        raise KVBenchError(
            f"{source}: no samples (empty file); {REFETCH.replace(', or fix the line', '')}, "
            "or leave the task out with task.subsets"
        )
    for number, row in rows:
        where = f"{source}:{number}"
        missing = [name for name in REQUIRED if _absent(row.get(name))]
        if missing:
            raise KVBenchError(f"{where}: sample lacks the field(s) {', '.join(missing)}; {REFETCH}")
        answers = row["answers"]
        if isinstance(answers, str) or not _is_list(answers):
            kind = "a string" if isinstance(answers, str) else type(answers).__name__
            raise KVBenchError(f"{where}: `answers` must be a list of strings, got {kind}; write it as [\"...\"]")
        if e_file and (_absent(row.get("length")) or row.get("length") == ""):
            raise KVBenchError(
                f"{where}: LongBench-E sample lacks `length` (its length bucket needs it); {REFETCH}"
            )
        if classification and not _is_list(row.get("all_classes")):
            raise KVBenchError(f"{where}: classification sample lacks the list `all_classes`; {REFETCH}")
    return [row for _, row in rows]


def _absent(value) -> bool:
    """None, or the NaN a parquet file gives for a missing value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_list(value) -> bool:
    """A JSON list, or the array a parquet file gives."""
    return value is not None and not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__")
