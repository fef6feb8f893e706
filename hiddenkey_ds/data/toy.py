"""builtin:toy-sst2: a small sentiment task generated from a fixed seed, so tiny recipes run anywhere.

The tiny CPU recipes must not depend on files a fresh clone lacks (../shared) nor on the hub, so their data is
generated here: short movie-review sentences with SST-2's columns (sentence, label, idx; 0 = negative,
1 = positive), trained with the `sst2` template. Negation ("was not good") and contrast ("good but ...")
make it more than a keyword lookup. The seed is fixed: the dataset is the same everywhere, whatever the
run's seed.
"""
from __future__ import annotations

import random

TOY_SST2 = "builtin:toy-sst2"
SIZES = {"train": 2000, "validation": 200}
_SEED = 20240607

SUBJECTS = ["the movie", "the film", "the acting", "the story", "the plot", "the ending", "the script",
            "the soundtrack", "the cast", "the director's work", "this sequel", "the dialogue", "the pacing",
            "the first hour", "the final scene", "the performance"]
POSITIVE = ["wonderful", "moving", "funny", "brilliant", "charming", "delightful", "gripping", "beautiful",
            "smart", "touching", "fresh", "superb", "memorable", "clever", "warm", "great", "good", "enjoyable"]
NEGATIVE = ["boring", "dull", "awful", "clumsy", "tedious", "predictable", "bland", "painful", "weak",
            "forgettable", "silly", "lifeless", "messy", "terrible", "bad", "flat", "tiresome", "stale"]
INTENSIFIERS = ["", "", "really ", "truly ", "quite ", "very ", "surprisingly ", "utterly "]
CONTRASTS = ["but", "yet", "although", "even if"]


def _sentence(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    words = POSITIVE if label else NEGATIVE
    subject = rng.choice(SUBJECTS)
    kind = rng.random()
    if kind < 0.55:
        text = f"{subject} was {rng.choice(INTENSIFIERS)}{rng.choice(words)}"
    elif kind < 0.75:
        # negation flips the adjective's polarity: "not boring" reads as mildly positive
        flipped = NEGATIVE if label else POSITIVE
        text = f"{subject} was not {rng.choice(flipped)}"
    else:
        # contrast: the clause after "but" carries the verdict
        other = NEGATIVE if label else POSITIVE
        text = (f"{subject} was {rng.choice(other)} {rng.choice(CONTRASTS[:2])} "
                f"{rng.choice(SUBJECTS)} was {rng.choice(INTENSIFIERS)}{rng.choice(words)}")
    return text + rng.choice([".", ".", "!"]), label


def toy_sst2_rows(split: str) -> list[dict]:
    """The rows of one split ("train" or "validation"); identical on every machine and every call."""
    if split not in SIZES:
        raise KeyError(f"{TOY_SST2} has splits {sorted(SIZES)}, not {split!r}")
    rng = random.Random(f"{_SEED}-{split}")
    rows = []
    for idx in range(SIZES[split]):
        text, label = _sentence(rng)
        rows.append({"sentence": text, "label": label, "idx": idx})
    return rows


def corpus_sentences() -> list[str]:
    """Text for training the builtin tiny tokenizer: the toy task's language plus plain English."""
    return [row["sentence"] for row in toy_sst2_rows("train")[:600]]
