"""`kvbench` (or `python -m kvbench`): what can be run, and the other entry points by name.

    kvbench list                  # methods, tasks, models, experiments: one line each
    kvbench list methods          # one group
    kvbench run ARGS...           # = kvbench-run ARGS... (python -m kvbench.run)
    kvbench table ARGS...         # = kvbench-table;  kvbench compare ARGS... = kvbench-compare
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvbench.resources import CONFIG_DIR

GROUPS = {"methods": "method", "tasks": "task", "models": "model", "experiments": "experiment"}


def describe(path: Path, width: int = 110) -> str:
    """A config file's description: its `description:` key, else the first sentence of its leading comment."""
    block = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("description:"):
            return text.split(":", 1)[1].strip().strip("'\"")
        if text.startswith("#"):
            if "@package" not in text:
                block.append(text.lstrip("# "))
        elif block or text:
            break
    sentence = " ".join(block).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 1].rstrip() + "…"


def listing(groups=None) -> dict[str, dict[str, str]]:
    """{group: {config name: description}} for the groups asked (default: all four)."""
    out = {}
    for plural in groups or GROUPS:
        folder = CONFIG_DIR / GROUPS[plural]
        out[plural] = {p.stem: describe(p) for p in sorted(folder.glob("*.yaml"))}
    return out


def print_listing(groups=None) -> None:
    for plural, entries in listing(groups).items():
        print(f"{plural} ({GROUPS[plural]}=NAME):")
        width = max(map(len, entries), default=0)
        for name, text in entries.items():
            print(f"  {name:<{width}}  {text}")
        print()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command == "list":
        unknown = [g for g in rest if g not in GROUPS]
        if unknown:
            print(f"kvbench: error: nothing to list named {unknown[0]}; choose from: {', '.join(GROUPS)}", file=sys.stderr)
            return 2
        print_listing(rest or None)
        return 0
    if command in ("run", "table", "compare"):
        sys.argv = [f"kvbench-{command}", *rest]
        if command == "run":
            from kvbench.run import main as run_main

            run_main()
            return 0
        module = __import__(f"kvbench.{'tables' if command == 'table' else 'compare'}", fromlist=["main"])
        return module.main(rest)
    print(__doc__.strip())
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
