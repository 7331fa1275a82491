"""A non-editable wheel runs from any directory: configs ship as package data; paper reproduction (papers/) stays
in the checkout, and `kvbench reproduce` says so in one line."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("kvbench", "hydra_plugins", "configs", "pyproject.toml", "README.md")


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of the source (the checkout stays clean), with this interpreter's hatchling."""
    src = tmp_path / "src"
    for name in SOURCES:
        source, target = ROOT / name, src / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("kvbench-*.whl")
    return wheel


def fresh_venv(tmp_path: Path) -> Path:
    """A new venv that sees this interpreter's packages (torch, transformers, ...) but not its kvbench."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    (site,) = (env_dir / "lib").glob("python*/site-packages")
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended after the venv's own
    return env_dir


@pytest.mark.slow
def test_wheel_runs_from_another_directory(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvbench/configs/config.yaml" in names and "kvbench/configs/experiment/demo.yaml" in names
    assert "kvbench/assets/tiny-llama/config.json" in names and "kvbench/tasks/data/longbench.json" in names
    assert not [n for n in names if n.startswith(("papers/", "tests/", "scripts/"))]
    assert "hydra_plugins/kvbench_sweeper/kvbench_sweeper.py" in names and "hydra_plugins/__init__.py" not in names
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    on_disk = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "kvbench").rglob("__init__.py")}
    assert on_disk <= shipped, f"subpackages missing from the wheel: {on_disk - shipped}"

    env_dir = fresh_venv(tmp_path)
    python = env_dir / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")

    def run(*cmd):
        out = subprocess.run([str(env_dir / "bin" / cmd[0]), *cmd[1:]], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{cmd}: {out.stderr[-3000:]}"
        return out.stdout

    where = run("python", "-c", "import kvbench; print(kvbench.__file__)")
    assert str(env_dir) in where  # the wheel's kvbench, not the checkout's
    assert "streamingllm" in run("kvbench", "list", "methods")
    run("kvbench-run", "method=streamingllm", "budget.tokens=32", "task.num_samples=1", "task.context_tokens=300",
        "logger=none", "paths.results=results")
    (scores,) = (elsewhere / "results" / "runs").glob("tiny/passkey/streamingllm/tokens32-*/scores.json")
    assert "streamingllm" in run("kvbench-table", "--results", "results")
    sweep = subprocess.run([str(env_dir / "bin" / "kvbench"), "run", "-m", "method=full", "budget.tokens=32,64",
                            "task.num_samples=1", "task.context_tokens=300", "logger=none", "paths.results=results"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 0 and "launched once" in sweep.stderr, sweep.stderr[-2000:]  # the wheel's sweeper
    out = subprocess.run([str(env_dir / "bin" / "kvbench"), "reproduce", "streamingllm_sinks", "--no-run"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "source checkout" in out.stderr and "Traceback" not in out.stderr
