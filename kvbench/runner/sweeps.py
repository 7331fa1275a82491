"""Hydra sweep overrides expanded to jobs, the way Hydra's basic sweeper does it (no launch).

Used by `kvbench.runner.status <experiment>` (the runs a sweep will write) and by `kvbench.runner.run -m ... --cfg job`
(Hydra refuses --cfg with -m: kvbench shows the sweep's first job instead).
"""

from __future__ import annotations

import itertools

from hydra.core.override_parser.overrides_parser import OverridesParser


def jobs(params: dict[str, str], overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """(fixed overrides, one override list per job) of sweeper `params` with the command line `overrides` on top.

    As in Hydra's sweeper, a command-line key replaces the same key of `params`, and every sweep
    (`a,b`, `range(4)`, `choice(...)`) is one axis of the cartesian product.
    """
    parser = OverridesParser.create()
    swept = [o for o in overrides if o.split("=", 1)[0] in params or parser.parse_override(o).is_sweep_override()]
    fixed = [o for o in overrides if o not in swept]
    params = {**params, **dict(o.split("=", 1) for o in swept)}
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()])]
    return fixed, [list(combo) for combo in itertools.product(*axes)]
