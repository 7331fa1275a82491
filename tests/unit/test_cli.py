"""The `kvbench` command's surface (kvbench.cli) and the package's public API names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kvbench
import kvbench.engine
from kvbench import cli
from kvbench.methods import REGISTRY
from kvbench.resources import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
ALIASES: dict[str, str] = {}  # old names kept working, not listed in `kvbench --help` (`compare` is its own command now)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """kvbench.cli.main(argv) in-process: (exit status, stdout, stderr); argparse's SystemExit counts as a return."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = 0 if exit_.code is None else exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv", [[], ["help"], ["-h"], ["--help"]])
def test_help_lists_every_subcommand(argv, capsys):
    status, out, err = call(argv, capsys)
    assert status == 0, err
    listed = {line.split()[1] for line in out.splitlines() if line.strip().startswith("kvbench ")}
    assert listed == set(cli.COMMANDS) - set(ALIASES)


def test_aliases_are_commands():
    for alias, name in ALIASES.items():
        assert alias in cli.COMMANDS and name in cli.COMMANDS


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_subcommand_help(name, capsys):
    status, out, err = call([name, "--help"], capsys)
    assert status == 0, err
    text = out + err
    assert text.strip(), f"`kvbench {name} --help` printed nothing"
    # argparse's usage line, or a docstring that shows the invocation (`kvbench run ...`, `python -m kvbench...`)
    assert "usage" in text.lower() or "kvbench" in text, text[:300]


def test_run_help_is_the_runner_doc(capsys):
    from kvbench.runner import main as runner_main

    status, out, _ = call(["run", "--help"], capsys)
    assert status == 0
    assert runner_main.__doc__.strip() in out
    assert "kvbench run -m experiment=demo" in out


def test_unknown_subcommand_exits_2(capsys):
    status, out, err = call(["no-such-command"], capsys)
    assert status == 2
    assert "unknown command 'no-such-command'" in err
    assert "kvbench run" in out  # the usage follows


def test_unknown_subcommand_exit_status_of_the_process():
    out = subprocess.run([sys.executable, "-m", "kvbench", "no-such-command"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "unknown command" in out.stderr


def test_unknown_list_group_exits_2(capsys):
    status, _, err = call(["list", "nothing"], capsys)
    assert status == 2
    assert "nothing to list named nothing" in err


def listed_names(out: str, group: str) -> list[str]:
    """The names under `group (...):` in `kvbench list`'s output."""
    names, inside = [], False
    for line in out.splitlines():
        if not line.startswith(" "):
            inside = line.startswith(f"{group} (")
        elif inside and line.strip() and not line.startswith("   "):  # deeper lines: a method's facts
            names.append(line.split()[0])
    return names


def test_list_methods_lists_every_method_config(capsys):
    status, out, _ = call(["list", "methods"], capsys)
    assert status == 0
    names = listed_names(out, "methods")
    configs = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
    assert sorted(names) == configs
    # every registered method has a config of its own name, so every method is listed
    assert set(REGISTRY) <= set(names)
    assert not [line for line in out.splitlines() if line.startswith("tasks")]  # only the group asked
    facts = {line.split()[0]: next_line for line, next_line in zip(out.splitlines(), out.splitlines()[1:])
             if line.startswith("  ") and not line.startswith("   ")}
    assert "stages prefill/decode | query-agnostic | extra cost: key norms" in facts["knorm"]
    assert "stages prefill | query-aware" in facts["snapkv"] and "FasterDecoding/SnapKV" in facts["snapkv"]
    # a config that turns on a wrapper shows its cost and reference too
    assert "(CriticalKV)" in facts["critical_snapkv"] and "kvpress CriticalKVPress" in facts["critical_snapkv"]
    assert "stages prefill | query-agnostic | extra cost: KV at 2/4 bits" in facts["kivi"]


def test_list_all_groups(capsys):
    status, out, _ = call(["list"], capsys)
    assert status == 0
    for plural, group in cli.GROUPS.items():
        assert sorted(listed_names(out, plural)) == sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# -- the public API


@pytest.mark.parametrize("name", ["Session", "Budget", "compress", "evaluate", "KVBenchError", "CompressedCache"])
def test_public_names_resolve(name):
    value = getattr(kvbench, name)
    assert value is not None
    assert name in dir(kvbench)


def test_public_names_are_the_engines():
    from kvbench.api import compress, evaluate
    from kvbench.engine import Budget, Session
    from kvbench.errors import KVBenchError

    assert kvbench.Session is Session and kvbench.Budget is Budget
    assert kvbench.compress is compress and kvbench.evaluate is evaluate
    assert kvbench.KVBenchError is KVBenchError and issubclass(KVBenchError, Exception)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_name"):
        kvbench.no_such_name  # noqa: B018


def test_engine_all_names_exist():
    assert kvbench.engine.__all__
    missing = [name for name in kvbench.engine.__all__ if not hasattr(kvbench.engine, name)]
    assert not missing
    assert len(set(kvbench.engine.__all__)) == len(kvbench.engine.__all__)
