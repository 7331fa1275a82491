"""The README's commands, in the README's order after `make demo-tiny`, all run (scaled down, in a tmp folder).

Each command of README.md's "Running" block (and `make demo-tiny` / `make sweep` as the Makefile spells
them) runs in-process through `kvbench.runner.main.main`, with one sample of 300 tokens; the demo's sweep is
narrowed to two methods on passkey. Every command must exit 0 and each distinct setting get its own run.
"""

import re
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]
SCALE = {"task.num_samples": "1", "task.context_tokens": "300"}
DEMO_NARROW = ["task=passkey", "method=full,streamingllm", "budget.tokens=128"]


def make_recipe(target: str, assignments: dict) -> list[str]:
    """The arguments `make <target> VAR=...` passes to `kvbench run`, from the Makefile."""
    text = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+)\s*\?=\s*(.*?)\s*$", text, flags=re.M))
    recipe = re.search(rf"^{target}:.*\n\t\$\(PY\) -m kvbench run (.*)$", text, flags=re.M).group(1)
    values = {**defaults, **assignments}
    return re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), ""), recipe).split()


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Running", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [make_recipe("demo-tiny", {})]  # the fast demo; `make demo` is the real model's
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("kvbench run"):
            commands.append(line.split()[2:])
        elif line.startswith("make sweep"):
            commands.append(make_recipe("sweep", dict(a.split("=", 1) for a in line.split()[2:])))
    return commands


def scaled(args: list[str]) -> list[str]:
    keys = {a.split("=", 1)[0] for a in args}
    out = [f"{k}={SCALE[k]}" if k in SCALE else a for a, k in ((a, a.split("=", 1)[0]) for a in args)]
    out += [f"{k}={v}" for k, v in SCALE.items() if k not in keys]
    if "experiment=demo" in args:
        out += DEMO_NARROW
    return out


@pytest.mark.slow
def test_readme_commands_run_in_order_after_the_demo(tmp_path, monkeypatch):
    commands = readme_commands()
    assert len(commands) >= 7 and commands[0] == ["-m", "experiment=demo"]
    monkeypatch.chdir(tmp_path)
    from kvbench.runner.main import main

    for args in commands:
        GlobalHydra.instance().clear()
        argv = ["kvbench-run", *scaled(args), "logger=none", f"paths.results={tmp_path / 'results'}"]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            main()
        except SystemExit as exit:
            assert not exit.code, f"{' '.join(argv)} exited {exit.code}"
    runs = sorted(p.relative_to(tmp_path / "results" / "runs") for p in (tmp_path / "results" / "runs").glob("*/*/*/*"))
    streaming = [p for p in runs if p.parts[2] == "streamingllm"]
    # the demo's depth_max=0.5 and the decode/shifted run differ from the defaults: each has its own folder
    assert len({p.name for p in streaming}) == len(streaming)
    assert any(p.name.startswith("ratio0.5-") for p in streaming)
    assert sum(p.name.startswith("tokens128-") for p in streaming) >= 2  # the demo's and the decode+shifted run
    assert sum(p.parts[2] == "full" for p in runs) == 2  # the demo's (depth_max 0.5) and the default's
