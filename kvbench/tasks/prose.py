"""Real English prose: Lewis Carroll, *Alice's Adventures in Wonderland* (1865).

Public domain; the text of Project Gutenberg eBook #11 (Millennium Fulcrum Edition 3.0) without the
Project Gutenberg header and licence (kvbench/assets/texts/README.md). Used as the needle haystack
of the real-model demo (`task.filler=prose`) and as perplexity text (`task=ppl_alice`). The file is
not shipped yet (no registry package carries it): put it at `$KVBENCH_TEXTS/alice_in_wonderland.txt`
(default `~/.cache/kvbench/texts/`); a missing file is one error naming that path.
"""

from __future__ import annotations

import os
import random
import re
from functools import lru_cache
from pathlib import Path

from kvbench import KVBenchError

ALICE_NAME = "alice_in_wonderland.txt"


def alice_path() -> Path:
    """Where the book is read from: $KVBENCH_TEXTS, else ~/.cache/kvbench/texts."""
    folder = Path(os.environ.get("KVBENCH_TEXTS") or Path.home() / ".cache" / "kvbench" / "texts")
    path = folder / ALICE_NAME
    if not path.exists():
        raise KVBenchError(f"{path} not found: save Project Gutenberg eBook #11 (plain text, header and licence "
                           "removed) there, or set KVBENCH_TEXTS to the folder that holds it")
    return path


@lru_cache(maxsize=4)
def paragraphs(path: Path | None = None) -> tuple[str, ...]:
    """The text's paragraphs, hard line breaks joined, blank lines and `* * *` rules dropped."""
    out = []
    for block in re.split(r"\n\s*\n", (path or alice_path()).read_text(encoding="utf-8")):
        text = " ".join(line.strip() for line in block.splitlines()).strip()
        if text and text.strip("* "):
            out.append(text)
    return tuple(out)


def chapters(path: Path | None = None) -> list[str]:
    """The text cut at its `CHAPTER` headings (each heading starts its chapter)."""
    text = (path or alice_path()).read_text(encoding="utf-8")
    parts = re.split(r"\n(?=CHAPTER [IVXLC]+\.)", text)
    return [p.strip() for p in parts[1:]]


def prose_pieces(rng: random.Random, tokenizer, room: int, path: Path | None = None) -> list[str]:
    """Consecutive paragraphs (each ending in a newline) from a seeded start, as many as fit in `room`
    tokens (past the last paragraph it goes on from the first); each paragraph at most once, so no
    text repeats within one prompt."""
    paras = paragraphs(path)
    empty = len(tokenizer("").input_ids)
    start = rng.randrange(len(paras))
    pieces, used = [], 0
    for para in paras[start:] + paras[:start]:
        piece = para + "\n"
        cost = len(tokenizer(piece).input_ids) - empty
        if used + cost > room:
            return pieces
        pieces.append(piece)
        used += cost
    raise KVBenchError(f"{(path or alice_path()).name} is shorter than {room} tokens; lower task.context_tokens")
