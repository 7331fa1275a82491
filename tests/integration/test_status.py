"""`kvbench status`: finished / partial (n of m, which shards) / missing, for a folder or an experiment."""

import json
import os
import re

from kvbench.runner.lock import RunLock
from kvbench.runner.run import execute, plan, resolve
from kvbench.runner.status import main
from tests.integration.test_run import config

# the demo experiment narrowed to the settings the runs below are made with (a setting is part of a run's id)
SWEEP = ["task=passkey", "method=full,streamingllm,h2o", "budget.tokens=32,64", "task.num_samples=3",
         "task.context_tokens=300", "task.depth_max=1.0"]


def lines_of(capsys):
    out = capsys.readouterr().out.splitlines()
    folder = lambda line: re.sub(r"-[0-9a-f]{8}$", "", next(t for t in line.split() if "/runs/" in t).split("/runs/")[1])  # noqa: E731
    return {folder(line): line for line in out[:-1]}, out[-1]


def test_status_of_a_sweep_and_of_a_results_folder(tmp_path, capsys):
    results = f"paths.results={tmp_path}"
    execute(config(tmp_path, "method=full", "task.num_samples=3"))  # finished
    execute(config(tmp_path, "method=streamingllm", "budget.tokens=32", "task.num_samples=2"))  # 2 of the 3
    sharded = ["method=h2o", "budget.tokens=64", "task.num_samples=3", "run.num_shards=3"]
    execute(config(tmp_path, *sharded, "run.shard=0"))
    h2o = plan(resolve(config(tmp_path, *sharded))).path
    (h2o / "predictions.2-of-3.jsonl").write_text(json.dumps({"id": "passkey-2"}) + "\n")  # shard 2 died
    lock = RunLock(h2o / ".lock.1-of-3").acquire()  # shard 1 is being written (by this process, here)
    lock.path.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "since": "now"}))

    assert main(["demo", *SWEEP, results]) == 0
    rows, total = lines_of(capsys)
    assert sorted(rows) == ["tiny/passkey/full/full", "tiny/passkey/h2o/tokens32", "tiny/passkey/h2o/tokens64",
                            "tiny/passkey/streamingllm/tokens32", "tiny/passkey/streamingllm/tokens64"]
    assert rows["tiny/passkey/full/full"].split()[:4] == ["finished", "3", "of", "3"]
    assert rows["tiny/passkey/streamingllm/tokens32"].split()[:4] == ["partial", "2", "of", "3"]
    assert rows["tiny/passkey/streamingllm/tokens64"].split()[0] == "missing"
    h2o_row = rows["tiny/passkey/h2o/tokens64"]
    assert h2o_row.split()[:4] == ["partial", "2", "of", "3"]
    assert f"shards of 3: done 0; running 1 ({os.uname().nodename} pid {os.getppid()}); partial 2" in h2o_row
    assert total == "1 finished, 2 partial, 2 missing (of 5 runs)"

    assert main(["demo", *SWEEP, results, "task.num_samples=2"]) == 0  # fewer samples wanted: streamingllm is done
    rows, _ = lines_of(capsys)
    assert rows["tiny/passkey/streamingllm/tokens32"].startswith("finished")

    assert main([str(tmp_path)]) == 0  # a results folder: what is there
    rows, total = lines_of(capsys)
    assert len(rows) == 3 and total == "2 finished, 1 partial, 0 missing (of 3 runs)"  # as their configs ask
    lock.path.unlink()
    assert main(["no-such-experiment"]) == 2
    assert "neither a folder nor an experiment" in capsys.readouterr().err


def test_status_of_an_ad_hoc_sweep_and_of_its_sweep_folder(tmp_path, capsys):
    """No experiment name: the overrides alone, or the sweep folder Hydra left (multirun.yaml, runs.txt); its
    .hydra folders (each holding a config.yaml) are never runs."""
    import yaml

    results = f"paths.results={tmp_path}"
    done = execute(config(tmp_path, "method=streamingllm", "budget.tokens=32", "task.num_samples=2"))
    sweep = ["method=full,streamingllm", "budget.tokens=32,64", "task.num_samples=2", "task.context_tokens=300",
             "task.depth_max=1.0", "logger=none"]
    assert main([*sweep, results]) == 0
    rows, total = lines_of(capsys)
    assert sorted(rows) == ["tiny/passkey/full/full", "tiny/passkey/streamingllm/tokens32",
                            "tiny/passkey/streamingllm/tokens64"]
    assert rows["tiny/passkey/streamingllm/tokens32"].split()[0] == "finished"
    assert total == "1 finished, 0 partial, 2 missing (of 3 runs)"

    folder = tmp_path / "multirun" / "2026-12-04" / "10-00-00"
    (folder / "0" / ".hydra").mkdir(parents=True)
    (folder / "0" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [*sweep, results]},
                                                                    "runtime": {"choices": {"experiment": None}}}}))
    (folder / "runs.txt").write_text(f"{done}\n")
    assert main([str(folder)]) == 0
    rows, total = lines_of(capsys)
    assert len(rows) == 3 and total == "1 finished, 0 partial, 2 missing (of 3 runs)"
    assert main([str(tmp_path)]) == 0  # the results folder: its one run, not the sweep's .hydra folder
    rows, total = lines_of(capsys)
    assert list(rows) == ["tiny/passkey/streamingllm/tokens32"]
