"""The documentation site builds: `mkdocs build --strict` of the repository's mkdocs.yml (broken links, missing
pages and bad references are errors under --strict)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MKDOCS_YML = REPO / "mkdocs.yml"


def mkdocs_command() -> list[str]:
    exe = Path(sys.executable).with_name("mkdocs")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mkdocs")
    if found:
        return [found]
    pytest.skip("mkdocs is not installed (pip install mkdocs mkdocs-material)")


def test_docs_build_strict(tmp_path):
    if not MKDOCS_YML.exists():
        pytest.skip(f"no {MKDOCS_YML.name} at the repository root yet: nothing to build")
    command = mkdocs_command()
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([*command, "build", "--strict", "--config-file", str(MKDOCS_YML), "--site-dir", str(site)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (site / "index.html").exists()
