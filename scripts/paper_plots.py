"""The papers' figures from results/ (the same functions notebooks/paper_plots.ipynb calls).

    python scripts/paper_plots.py                  # results/plots/paper_*.png
    python scripts/paper_plots.py --results /data/kvbench-results
"""

import argparse
import sys

from kvbench.paper_plots import make_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the results folder (runs/, analysis/)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("kvbench: error: plots need matplotlib: pip install -e '.[plots]'", file=sys.stderr)
        return 2
    for name, path in make_all(args.results).items():
        print(f"{name}: {path if path else 'no data under ' + args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
