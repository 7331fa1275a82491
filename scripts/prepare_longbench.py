"""Download LongBench v1's official data.zip and unzip its jsonl files (run once, online).

    python scripts/prepare_longbench.py                      # -> data/longbench/{task}.jsonl, {task}_e.jsonl
    python scripts/prepare_longbench.py --out /data/longbench
    kvbench run task=longbench task.data_dir=/data/longbench ...

The archive is cached by huggingface_hub (HF_HOME), so a second call is offline.
The hub repo THUDM/LongBench is a loading script, which datasets >= 4 refuses;
its data.zip is the route that works.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvbench.tasks.longbench import E_TASKS, TASKS, extract_data_zip  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/longbench")
    parser.add_argument("--repo", default="THUDM/LongBench")
    args = parser.parse_args(argv)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        print("note: HF_HUB_OFFLINE is set; only a cached data.zip can be used (unset it to download)")
    out = extract_data_zip(args.repo, args.out)
    wanted = TASKS + [f"{t}_e" for t in E_TASKS]
    missing = [name for name in wanted if not (out / f"{name}.jsonl").exists()]
    print(f"unzipped into {out}: {len(wanted) - len(missing)} of the {len(wanted)} English files kvbench uses")
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
