"""The Python API: one run from a notebook or a script, the same run the command line makes.

    import kvbench
    result = kvbench.evaluate(model="tiny", method="snapkv", budget=128, task="passkey",
                              **{"task.num_samples": 5})
    result.scores["scores"], result.records[0]["prediction"]

    model, tokenizer = AutoModelForCausalLM.from_pretrained(...), AutoTokenizer.from_pretrained(...)
    kvbench.evaluate(model=model, tokenizer=tokenizer, method="h2o", budget=0.5, results="results")

`model` is a config name (`kvbench list models`), a hub id or local folder
(`model.path=...`, named after it), or an already-loaded transformers model
with its `tokenizer`. `budget` is tokens (an int) or a ratio of the prompt (a
float < 1). Other settings are dotted overrides as keyword arguments
(`**{"task.limit": 2}`; `task__limit=2` works too). With `results=DIR` the run
folder is written under DIR/runs/ exactly as `python -m kvbench.run` writes it
(and a finished run there is read back, not rerun); without it the run goes to
a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kvbench import KVBenchError


def _group_overrides(model, method: str, budget, task: str, logger: str) -> list[str]:
    overrides = [f"method={method}", f"task={task}", f"logger={logger}"]
    if isinstance(model, str):
        from kvbench.resources import CONFIG_DIR

        is_config = (CONFIG_DIR / "model" / f"{model}.yaml").exists()
        overrides += [f"model={model}"] if is_config else ["model=tiny", f"model.path={model}"]
    if isinstance(budget, bool) or not isinstance(budget, int | float | type(None)):
        raise KVBenchError(f"budget={budget!r}: give tokens (an int), a ratio of the prompt (a float < 1) or None")
    if isinstance(budget, float) and budget < 1:
        overrides += ["budget=ratio", f"budget.ratio={budget}"]
    elif budget is not None:
        overrides += [f"budget.tokens={int(budget)}"]
    return overrides


def _loaded_model_config(model, overrides: dict) -> dict:
    """The model section for a model the caller loaded: named after its hub id or folder."""
    source = getattr(model.config, "_name_or_path", None) or type(model).__name__
    base = getattr(model.config, "kvbench_base_attention", None) or getattr(model.config, "_attn_implementation", "sdpa")
    return {
        "name": Path(str(source).rstrip("/")).name,
        "path": str(source),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "attn_implementation": base if base in ("sdpa", "eager", "flash_attention_2") else "sdpa",
        "chat_format": overrides.pop("model.chat_format", "none"),
        "max_prompt_tokens": overrides.pop("model.max_prompt_tokens", None),
        "loaded_by_caller": True,
    }


def evaluate(model="tiny", method: str = "full", budget=None, task: str = "passkey", *, tokenizer=None,
             results: str | Path | None = None, logger: str = "none", **overrides):
    """Run `model` x `method` x `budget` x `task` (resuming what is on disk); a `kvbench.run.RunResult`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvbench.attention import install
    from kvbench.resources import CONFIG_DIR
    from kvbench.run import check_overrides, run_config

    loaded = not isinstance(model, str)
    if loaded and tokenizer is None:
        raise KVBenchError("kvbench.evaluate(model=<a loaded model>) needs its tokenizer=")
    settings = {key.replace("__", "."): value for key, value in overrides.items()}
    groups = _group_overrides(model, method, budget, task, logger)
    problem = check_overrides(groups)
    if problem:
        raise KVBenchError(problem)
    with tempfile.TemporaryDirectory(prefix="kvbench-") as scratch:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*groups, f"paths.results={results or scratch}"])
        OmegaConf.set_struct(cfg, False)
        if loaded:
            cfg.model = _loaded_model_config(model, settings)
            install(model, base=cfg.model.attn_implementation)
        for key, value in settings.items():
            if OmegaConf.select(cfg, key, default=KeyError) is KeyError and key.split(".")[0] not in ("run", "paths"):
                raise KVBenchError(f"{key} is not a setting of this run; see configs/ (or `kvbench list`)")
            OmegaConf.update(cfg, key, value, force_add=True)
        result = run_config(cfg, model if loaded else None, tokenizer if loaded else None,
                            command=f"kvbench.evaluate({', '.join(groups)})")
        if results is None:
            result.path = None  # the scratch folder is gone
    return result
