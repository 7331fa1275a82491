"""`kvbench run`: one run = model x method x budget x task, configured by Hydra.

    kvbench run                                            # the defaults in configs/config.yaml
    kvbench run model=tiny method=streamingllm budget.tokens=64
    kvbench run -m method=full,streamingllm budget.tokens=32,64   # multirun sweep
    kvbench run -m experiment=demo

(`python -m kvbench run ...` and the `kvbench-run` alias are the same.) `main()` checks the overrides a
user can get wrong before Hydra starts and turns a KVBenchError into one line; the work is
`kvbench.runner.run.run_config`.
"""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from kvbench.errors import KVBenchError, error_exit
from kvbench.resources import CONFIG_DIR
from kvbench.runner.run import execute

GROUPS = ("model", "method", "budget", "task", "logger", "experiment")


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> str:
    try:
        return str(execute(cfg))
    except KVBenchError as err:
        sys.exit(error_exit(err))


def check_overrides(overrides: list[str]) -> str | None:
    """A one-line message for an unknown config choice (`method=foo`) or a budget <= 0, before Hydra starts."""
    for arg in overrides:
        match = re.fullmatch(r"([a-z_]+)=(.*)", arg)
        if not match:
            budget = re.fullmatch(r"budget\.(tokens|ratio)=(.*)", arg)
            if budget:
                for value in budget.group(2).split(","):
                    try:
                        bad = float(value) <= 0
                    except ValueError:
                        bad = value not in ("null", "") and not value.startswith(("range(", "choice("))
                    if bad:
                        return f"budget.{budget.group(1)}={value}: a budget must be a number > 0"
            continue
        group, values = match.groups()
        if group not in GROUPS or any(ch in values for ch in "()[]{}$*"):
            continue
        choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        for value in values.split(","):
            if group == "experiment" and value == "null":
                continue
            if value not in choices:
                return f"unknown {group} '{value}'; choose one of: {', '.join(choices)}"
    return None


def first_job_of_sweep(argv: list[str]) -> list[str]:
    """`-m ... --cfg job|hydra|all`, which Hydra refuses, as the arguments of the sweep's first job."""
    from kvbench.runner.sweeps import jobs

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    fixed, combos = jobs({}, overrides)
    flags = [a for a in argv if a not in overrides and a not in ("-m", "--multirun")]
    print(f"kvbench: a sweep of {len(combos)} job(s) on the command line (experiment sweeps aside); "
          f"the config of the first: {' '.join(combos[0]) or '(no swept keys)'}", file=sys.stderr)
    return flags + fixed + combos[0]


def main() -> None:
    problem = check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    if problem:
        print(f"kvbench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if {"-m", "--multirun"} & set(sys.argv) and {"--cfg", "-c"} & set(sys.argv):
        sys.argv[1:] = first_job_of_sweep(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
