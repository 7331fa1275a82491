"""Write kvbench/assets/haystack.txt: the hand-written opening paragraphs, then deterministic generated prose.

    python scripts/make_haystack.py            # rewrites the shipped file (byte-identical on every machine)

Head-score estimation (kvbench/headscores.py) needs a haystack that does not repeat within one prompt of up
to 10,000 Llama tokens. The generated part is built from small word lists by a seeded RNG; every sentence
is distinct, and nothing in it mentions the needles' topics. Our own text: no essay corpus is copied.
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "kvbench" / "assets" / "haystack.txt"
HAND_WRITTEN_PARAGRAPHS = 10  # the file's first paragraphs are kept as they are
TARGET_WORDS = 14_000
SEED = 20261123

PEOPLE = ["the surveyor", "an old carpenter", "the ferry captain", "a retired teacher", "the baker's apprentice",
          "the night watchman", "a travelling tinker", "the village clerk", "a young botanist", "the stonemason",
          "the postmistress", "a cartographer", "the miller", "a weaver from the valley", "the schoolmaster",
          "the harbour pilot", "a beekeeper", "the blacksmith", "a bookbinder", "the lamplighter"]
ACTIONS = ["mended the fence along", "counted the barrels stored near", "sketched the roofs of", "walked twice around",
           "swept the steps of", "measured the width of", "repainted the shutters of", "wrote a short letter about",
           "listened to the bells of", "carried firewood up to", "repaired the clock above", "planted hedges beside",
           "cleared the drain below", "photographed the gates of", "tested the well behind", "tidied the shelves in",
           "oiled the hinges of", "raked the gravel outside", "described the market in", "guided a visitor through"]
PLACES = ["the grain store", "the north quay", "the chapel on the hill", "the rope works", "the covered bridge",
          "the tannery yard", "the orchard wall", "the customs house", "the dye works", "the cider press",
          "the toll gate", "the salt marsh path", "the signal tower", "the old granary", "the town archive",
          "the pottery kiln", "the sheep fold", "the river lock", "the weighing house", "the glasshouse"]
TIMES = ["before breakfast", "on a windy afternoon", "late in the autumn", "during the spring fair",
         "after the first frost", "on the longest evening of the year", "while the tide was out",
         "in the week of the harvest", "just after the rain stopped", "at the end of a long winter",
         "on a market day", "before the bridge was widened", "in the year the river flooded",
         "while the road was being repaired", "on the morning of the regatta"]
def sentence(rng: random.Random) -> str:
    person, action, place, time = (rng.choice(x) for x in (PEOPLE, ACTIONS, PLACES, TIMES))
    if rng.random() < 0.5:
        return f"{time[0].upper()}{time[1:]}, {person} {action} {place}."
    other, action2, place2 = rng.choice(PEOPLE), rng.choice(ACTIONS), rng.choice(PLACES)
    return f"{person[0].upper()}{person[1:]} {action} {place} {time}, and {other} {action2} {place2}."


def generated(words: int, seed: int = SEED) -> str:
    rng = random.Random(seed)
    seen: set[str] = set()
    paragraphs, count = [], 0
    while count < words:
        sentences: list[str] = []
        target = rng.randint(4, 7)
        while len(sentences) < target:
            s = sentence(rng)
            if s not in seen:  # no sentence repeats anywhere in the file
                seen.add(s)
                sentences.append(s)
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        count += len(paragraph.split())
    return "\n\n".join(paragraphs)


def main() -> None:
    hand = "\n\n".join(OUT.read_text().split("\n\n")[:HAND_WRITTEN_PARAGRAPHS]).strip()
    OUT.write_text(f"{hand}\n\n{generated(TARGET_WORDS - len(hand.split()))}\n")
    print(f"wrote {OUT} ({len(OUT.read_text().split())} words)")


if __name__ == "__main__":
    main()
