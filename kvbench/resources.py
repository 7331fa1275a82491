"""Where kvbench's shipped files are: in a source checkout, `configs/` at the top of
the repository; in an installed wheel, the same files as package data (`kvbench/configs/`: pyproject.toml maps
them there, so there is one copy)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE / "assets"  # the tiny model, the byte tokenizer, the haystack, shipped head scores


def _first(*candidates: Path) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[-1])


CONFIG_DIR = _first(PACKAGE / "configs", PACKAGE.parent / "configs")
