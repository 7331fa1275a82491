"""`kvbench` (or `python -m kvbench`): one command, a subcommand per job. `kvbench SUBCOMMAND --help` for each.

    kvbench run [OVERRIDES...]          one run, or a sweep with -m (Hydra overrides: method=h2o budget.tokens=128)
    kvbench list [GROUP...]             methods, tasks, models, experiments: one line each
    kvbench table [--results DIR]       tables (one per task family) of every finished run
    kvbench report [--results DIR]      tables and the budget-vs-score plot of every finished run
    kvbench status [EXP|FOLDER]         finished / partial / missing runs of an experiment or a folder
    kvbench merge RUN_FOLDER            join a sharded run's shards (the last shard does it by itself)
    kvbench reproduce EXP [--scale S]   a paper's table: its sweep, then paper / ours / difference (a checkout)
    kvbench compare A B [--budget B]    two methods on the same samples: paired differences with 95% intervals
    kvbench check [--lengths N,...]     the GPU self-check: every method at 7B shape (a narrow model on the CPU)
    kvbench fetch                       the registry-shipped model and text (SmolLM2-135M, the Britannica article)
"""

from __future__ import annotations

import importlib
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


def list_configs(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: kvbench list [{'|'.join(GROUPS)} ...]\n\nThe configs of each group, one line each.")
        return 0
    unknown = [g for g in argv if g not in GROUPS]
    if unknown:
        print(f"kvbench: error: nothing to list named {unknown[0]}; choose from: {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    for plural, entries in listing(argv or None).items():
        print(f"{plural} ({GROUPS[plural]}=NAME):")
        width = max(map(len, entries), default=0)
        for name, text in entries.items():
            print(f"  {name:<{width}}  {text}")
            if plural == "methods":
                print(f"  {'':<{width}}    {method_facts(CONFIG_DIR / 'method' / f'{name}.yaml')}")
        print()
    return 0


def method_facts(path: Path) -> str:
    """A method config's stages, query awareness, extra cost and reference (kvbench.methods.info)."""
    import yaml

    from kvbench.methods import info

    facts = info(yaml.safe_load(path.read_text()))
    return (f"stages {facts['stages']} | {'query-aware' if facts['query_aware'] else 'query-agnostic'} | "
            f"extra cost: {facts['cost'] or 'none'} | {facts['reference'] or 'no reference'}")


def run(argv: list[str]) -> int:
    from kvbench.runner.main import main as run_main

    if argv[:1] in (["-h"], ["--help"]):
        print(importlib.import_module("kvbench.runner.main").__doc__)
        print("Hydra's own help: kvbench run --hydra-help")
        return 0
    sys.argv = ["kvbench run", *argv]
    run_main()
    return 0


def report(argv: list[str]) -> int:
    import argparse

    from kvbench.report.plots import main as plots_main
    from kvbench.report.tables import main as tables_main

    parser = argparse.ArgumentParser(prog="kvbench report", description="Tables and the budget-vs-score plot of "
                                     "every finished run under a results folder.")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="all", help="written as <results>/tables/<name>_<family>.* and "
                        "<results>/plots/<name>_budget_vs_score.png")
    args = parser.parse_args(argv)
    common = ["--results", args.results, "--name", args.name]
    return tables_main(common) or plots_main(common)


def papers():
    """The checkout's papers/ package (paper reproduction lives beside the library, not in the wheel)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "papers" / "reproduce.py").exists():
        print("kvbench: error: reproducing a paper needs a source checkout (papers/ beside kvbench/): "
              "git clone the repository and run `make reproduce-table EXP=...` there", file=sys.stderr)
        sys.exit(2)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("papers.reproduce")


def _papers_main(argv: list[str]) -> int:
    reproduce = papers()
    sys.argv[0] = "kvbench reproduce"
    return reproduce.main(argv)


def fetch(argv: list[str]) -> int:
    if argv:
        print("usage: kvbench fetch\n\nFetch (and convert) the registry-shipped model and text once into the cache.")
        return 0 if argv[0] in ("-h", "--help") else 2
    from kvbench.models.registry import main as models_main
    from kvbench.tasks.prose import main as text_main

    return models_main([]) or text_main()


def _module_main(module: str, name: str):
    def call(argv):
        sys.argv[0] = f"kvbench {name}"  # argparse's usage line names the subcommand
        return importlib.import_module(module).main(argv)

    return call


COMMANDS = {
    "run": run,
    "list": list_configs,
    "table": _module_main("kvbench.report.tables", "table"),
    "report": report,
    "status": _module_main("kvbench.runner.status", "status"),
    "merge": _module_main("kvbench.runner.merge", "merge"),
    "reproduce": _papers_main,
    "compare": _module_main("kvbench.report.compare", "compare"),
    "check": _module_main("kvbench.check", "check"),
    "fetch": fetch,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command in COMMANDS:
        return COMMANDS[command](rest) or 0
    print(__doc__.strip())
    if command not in ("help", "-h", "--help"):
        print(f"\nkvbench: error: unknown command '{command}'", file=sys.stderr)
        return 2
    return 0


def run_alias() -> None:
    """`kvbench-run ...`, the old entry point: `kvbench run ...`."""
    sys.exit(main(["run", *sys.argv[1:]]))


def table_alias() -> None:
    sys.exit(main(["table", *sys.argv[1:]]))


def compare_alias() -> None:
    sys.exit(main(["reproduce", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
