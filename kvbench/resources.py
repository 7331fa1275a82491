"""Where kvbench's shipped files are: in a source checkout, `configs/` and `results/paper/` at the top of
the repository; in an installed wheel, the same files as package data (`kvbench/configs/`,
`kvbench/paper/`: pyproject.toml maps them there, so there is one copy of each)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _first(*candidates: Path) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[-1])


CONFIG_DIR = _first(PACKAGE / "configs", PACKAGE.parent / "configs")
PAPER_DIR = _first(PACKAGE / "paper", PACKAGE.parent / "results" / "paper")
