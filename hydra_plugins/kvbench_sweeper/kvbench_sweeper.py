"""kvbench's Hydra sweeper: Hydra's basic sweeper, launching each run folder once.

A sweep's jobs can plan the same run folder: `-m method=full,streamingllm budget.tokens=32,64` has two `full`
jobs, and the full cache ignores the budget. Run in parallel (Slurm, submitit's local launcher), the second
would stop on the first's lock and fail the sweep. This sweeper plans every job before any is launched
(`kvbench.runner.run.plan`: the config is composed, nothing is loaded) and launches a run folder's first job
only, saying which it dropped; the sweep's table still has every row, since the kept job writes that folder.
A job whose config cannot be planned is launched as it is, so it fails with its own error. Selected by
configs/config.yaml (`hydra/sweeper: kvbench`); Hydra finds it in the `hydra_plugins` namespace package.
"""

from __future__ import annotations

import sys

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf, open_dict


class KVBenchSweeper(BasicSweeper):
    def split_arguments(self, overrides, max_batch_size):  # Hydra calls it on the instance
        from kvbench.errors import KVBenchError, error_exit
        from kvbench.runner.slurm import check_request

        try:
            launcher = OmegaConf.to_container(self.config.hydra.launcher, resolve=True)
        except Exception:  # noqa: BLE001 - a launcher config that does not resolve fails in Hydra, as before
            launcher = {}
        try:  # a request the cluster cannot meet: one line now, not a traceback or an array pending forever
            check_request(launcher)
        except KVBenchError as err:
            sys.exit(error_exit(err))
        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        jobs = [job for batch in batches for job in batch]
        kept = unique_jobs(jobs, self.planned_folder)
        return list(BasicSweeper.split_overrides_to_chunks(kept, max_batch_size)) if kept else []

    def planned_folder(self, job: list[str]):
        """(run folder, predictions file) job `job` (its overrides) will write, or None if it cannot be planned."""
        from kvbench.runner.run import plan, resolve

        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
            with open_dict(cfg):
                del cfg["hydra"]
            p = plan(resolve(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))
        except Exception:  # noqa: BLE001 - an unplannable job is launched and reports its own error
            return None
        return p.path, p.shard.predictions_name


def unique_jobs(jobs: list[list[str]], folder_of) -> list[list[str]]:
    """The jobs whose planned run folders differ, in order: the first of each folder is kept."""
    seen: dict = {}
    kept = []
    for job in jobs:
        folder = folder_of(job)
        if folder is not None and folder in seen:
            print(f"kvbench: {' '.join(job)} writes the same run folder as {' '.join(seen[folder])} "
                  f"({folder[0]}); launched once", file=sys.stderr)
            continue
        if folder is not None:
            seen[folder] = job
        kept.append(job)
    return kept
