"""Value-vector norms and attention sinks per layer of one text (VATP's motivating figure, arXiv 2406.12335).

    python scripts/analyze_value_norms.py                                   # tiny model, synthetic text
    python scripts/analyze_value_norms.py --model llama2-7b-chat --source pg19 --tokens 4096

Writes results/analysis/value_norms_<model>.json; kvbench.paper_plots draws it.
The model is a configs/model/ name; the text is the first document of a perplexity
source (a dataset name, a hub id, or a local .txt/.jsonl/.parquet file).
"""

import argparse
import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench import KVBenchError
from kvbench.analysis import write_value_norms
from kvbench.run import CONFIG_DIR, check_overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a configs/model/ name")
    parser.add_argument("--source", default="synthetic", help="pg19 | proofpile | arxiv | openwebtext2 | synthetic | a file")
    parser.add_argument("--tokens", type=int, default=1024, help="the first N tokens of the text")
    parser.add_argument("--sinks", type=int, default=4, help="how many most-attended tokens to mark per layer")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    try:
        problem = check_overrides([f"model={args.model}"])
        if problem:
            raise KVBenchError(problem)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"model={args.model}"])
        path = write_value_norms(OmegaConf.to_container(cfg.model, resolve=True), args.source, args.tokens,
                                 args.sinks, args.results)
    except KVBenchError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
