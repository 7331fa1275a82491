"""Download the two QA files RULER's qa_1 / qa_2 read (run once, online), as RULER's
scripts/data/synthetic/json/download_qa_dataset.sh does:

    python scripts/prepare_ruler_qa.py                 # -> data/ruler/squad.json, data/ruler/hotpotqa.json
    kvbench run task=ruler task.qa_dir=data/ruler ...

Without the files kvbench reads the same data from the Hugging Face cache (rajpurkar/squad_v2 validation,
hotpotqa/hotpot_qa distractor validation), which this fills instead:

    python -c "import datasets as d; d.load_dataset('rajpurkar/squad_v2', split='validation'); d.load_dataset('hotpotqa/hotpot_qa', 'distractor', split='validation')"
"""

import argparse
import sys
import urllib.request
from pathlib import Path

SOURCES = {  # RULER's download_qa_dataset.sh (HotpotQA: its first URL, then the hub mirror it falls back to)
    "squad.json": ["https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"],
    "hotpotqa.json": ["http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json",
                      "https://huggingface.co/datasets/namlh2004/hotpotqa/resolve/7e54db4656209750ff487f6fdf8e39a66dba136b/"
                      "hotpot_dev_distractor_v1.json"],
}


def fetch(urls: list[str], out: Path) -> None:
    """The first URL that answers, written whole (a partial download never takes the file's name)."""
    errors = []
    for url in urls:
        tmp = out.with_name(f".{out.name}.part")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            tmp.replace(out)
            return
        except OSError as err:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: {err}")
    raise OSError("; ".join(errors))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/ruler")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, urls in SOURCES.items():
        if (out / name).exists():
            print(f"{out / name} already there")
            continue
        try:
            fetch(urls, out / name)
        except OSError as err:
            print(f"kvbench: error: could not download {name} ({err}); run this where the internet is reachable",
                  file=sys.stderr)
            return 2
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
