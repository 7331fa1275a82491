"""The Python API: compress a loaded model's cache in your own code, or make a whole run as the command line does.

    with kvbench.compress(model, method="snapkv", budget=0.5, window=8) as session:   # a loaded HF causal LM
        tokens = session.generate(input_ids, max_new_tokens=32).tokens             # greedy, compressed cache
        # or drive it yourself: logits = session.prefill(input_ids); logits = session.step(next_ids)

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
folder is written under DIR/runs/ exactly as `kvbench run` writes it
(and a finished run there is read back, not rerun); without it the run goes to
a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvbench.engine import Budget, Session, install
from kvbench.engine.attention import BASE_IMPLEMENTATIONS, NAME
from kvbench.errors import KVBenchError
from kvbench.methods import build


@contextmanager
def compress(model, method: str = "snapkv", budget=None, *, reserve: int = 64, repeat=None,
             **settings) -> Iterator[Session]:
    """A `Session` of `model` whose cache `method` (a registry name, `kvbench list methods`; its settings as
    keyword arguments) compresses to `budget` (tokens: an int; a ratio of the prompt: a float < 1; None: no
    limit, nothing evicted). Inside the block the model runs kvbench's attention function on top of its
    own implementation; leaving it restores the model's implementation. `reserve`: decode tokens to allocate for.
    `repeat`: KVzip's prompts as token ids (`kvbench.models.chat.repeat_prompts(tokenizer, policy, input_ids)`)."""
    policy = build({"name": method, **settings})
    previous = model.config._attn_implementation
    if previous != NAME:
        install(model, base=previous if previous in BASE_IMPLEMENTATIONS else "sdpa")
    try:
        yield Session(model, policy, _budget(budget), reserve=reserve, repeat=repeat)
    finally:
        if previous != NAME:
            model.set_attn_implementation(previous)


def _budget(budget) -> Budget:
    """tokens (an int, or a float >= 1), a ratio of the prompt (a float < 1), or None (no limit)."""
    if isinstance(budget, bool) or not isinstance(budget, int | float | type(None)):
        raise KVBenchError(f"budget={budget!r}: give tokens (an int), a ratio of the prompt (a float < 1) or None")
    if isinstance(budget, float) and budget < 1:
        return Budget(ratio=budget)
    return Budget(tokens=None if budget is None else int(budget))


def _group_overrides(model, method: str, budget, task: str, logger: str) -> list[str]:
    overrides = [f"method={method}", f"task={task}", f"logger={logger}"]
    if isinstance(model, str):
        from kvbench.resources import CONFIG_DIR

        is_config = (CONFIG_DIR / "model" / f"{model}.yaml").exists()
        overrides += [f"model={model}"] if is_config else ["model=tiny", f"model.path={model}"]
    budget = _budget(budget)
    if budget.ratio is not None:
        overrides += ["budget=ratio", f"budget.ratio={budget.ratio}"]
    elif budget.tokens is not None:
        overrides += [f"budget.tokens={budget.tokens}"]
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
    """Run `model` x `method` x `budget` x `task` (resuming what is on disk); a `kvbench.runner.run.RunResult`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvbench.resources import CONFIG_DIR
    from kvbench.runner.main import check_overrides
    from kvbench.runner.run import run_config

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
            if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
                raise KVBenchError(f"{key} is not a setting of this run; see configs/ (or `kvbench list`)")
            OmegaConf.update(cfg, key, value, force_add=True)
        result = run_config(cfg, model if loaded else None, tokenizer if loaded else None,
                            command=f"kvbench.evaluate({', '.join(groups)})")
        if results is None:
            result.path = None  # the scratch folder is gone
    return result
