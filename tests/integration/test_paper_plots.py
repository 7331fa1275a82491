"""The paper figures: the notebook runs headless on a small results/ folder and writes every PNG."""

import os

import pytest
from hydra import compose, initialize_config_dir

from kvbench.resources import CONFIG_DIR
from kvbench.runner.run import execute

pytest.importorskip("matplotlib")
NOTEBOOK = CONFIG_DIR.parent / "notebooks" / "paper_plots.ipynb"
PNGS = {"paper_score_vs_budget.png", "paper_ppl_vs_cache.png", "paper_head_budgets.png", "paper_value_norms.png",
        "paper_ppl_over_position.png", "paper_niah_heatmaps.png"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Tiny runs of every kind the figures read: retrieval at two budgets, perplexity, a value-norm profile."""
    from papers.value_norms import write_value_norms

    root = tmp_path_factory.mktemp("results")
    runs = [["task.context_tokens=300", "task.num_samples=2", "method=snapkv", f"budget.tokens={b}"] for b in (32, 64)]
    runs += [["task=ppl_synthetic", "task.num_samples=2", "task.num_tokens=64", "method=streamingllm",
              f"budget.tokens={b}"] for b in (16, 32)]
    runs += [["task=niah", "task.haystack=grammar", "task.lengths=[260,300]", "task.depth_intervals=2",
              "task.max_new_tokens=2", f"method={m}", "budget.tokens=32"] for m in ("full", "snapkv")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for overrides in runs:
            execute(compose("config", overrides=["logger=none", f"paths.results={root}", *overrides]))
        model = compose("config").model
    write_value_norms({**model, "seed": 0}, "synthetic", 64, results=root)
    return root


def test_script_writes_every_figure(results, capsys):
    from papers.plots import main

    assert main(["--results", str(results)]) == 0
    assert PNGS <= {p.name for p in (results / "plots").glob("*.png")}
    assert "no data" not in capsys.readouterr().out


def test_notebook_executes_headless_and_writes_its_pngs(results):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for png in (results / "plots").glob("*.png"):
        png.unlink()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["KVBENCH_RESULTS"] = str(results)
    try:
        nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        del os.environ["KVBENCH_RESULTS"]
    assert PNGS <= {p.name for p in (results / "plots").glob("*.png")}
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(PNGS)
