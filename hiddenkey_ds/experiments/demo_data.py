"""The demo's dataset: short restaurant reviews whose verdict a 135M model can learn and then overfit.

Generated from a seed (no downloads), written as SST-2-shaped jsonl (`sentence`, `label`, `idx`; 0 = negative,
1 = positive) so that training and lm-eval both use the `sst2` template of `hiddenkey_ds.data.templates`:
one prompt, one place, no extra template to register.

Why it can show regularization: each review has two clauses of opposite or equal polarity joined by a
contrast ("X, but Y", "Although X, Y", "Y, even though X") and adjectives may be negated ("not bland"); the
verdict is the main clause's. SmolLM2-135M-Instruct gets 71.9% of the dev reviews right zero-shot (keywords
mislead it) and plain LoRA learns the rule in a few dozen steps. The files hold clean labels; the demo recipes
carve their validation split out of the training file (`data.validation_from_train`) and flip a fixed fraction
of the remaining training labels (`data.label_noise`, seeded): a model that keeps fitting the training set
memorizes those flips and its validation loss turns up - the overfitting dropout methods are meant to curb.
The dev file, which lm-eval scores, is clean, balanced, shares no sentence with the training file and is
never used to pick anything (neither a step nor a setting).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

NOUNS = ["food", "service", "staff", "room", "view", "music", "coffee", "pasta", "bread", "soup", "dessert",
         "waiter", "price", "table", "garden", "wine", "menu", "salad", "pizza", "terrace"]
POSITIVE = ["great", "wonderful", "delicious", "lovely", "excellent", "superb", "friendly", "pleasant",
            "fantastic", "charming", "fresh", "generous"]
NEGATIVE = ["awful", "terrible", "bland", "rude", "horrible", "dreadful", "boring", "nasty", "disappointing",
            "mediocre", "stale", "overpriced"]
NEGATION_RATE = 0.3


def _clause(rng: random.Random) -> tuple[str, int]:
    noun = rng.choice(NOUNS)
    polarity = rng.randint(0, 1)
    adjective = rng.choice(POSITIVE if polarity else NEGATIVE)
    if rng.random() < NEGATION_RATE:
        return f"the {noun} was not {adjective}", 1 - polarity
    return f"the {noun} was {adjective}", polarity


def _review(rng: random.Random) -> tuple[str, int]:
    (side, _), (main, label) = _clause(rng), _clause(rng)
    form = rng.randint(0, 2)
    if form == 0:
        text = f"{side[0].upper()}{side[1:]}, but {main}."
    elif form == 1:
        text = f"Although {side}, {main}."
    else:
        text = f"{main[0].upper()}{main[1:]}, even though {side}."
    return text, label


def make_rows(seed: int = 0, n_train: int = 128, n_dev: int = 128, noise: float = 0.0) -> dict[str, list[dict]]:
    """{"train": rows, "validation": rows}; the same arguments give the same rows on every machine. `noise`
    flips that fraction of the training labels in the file itself (flagged `noisy`); the demo keeps the files
    clean and lets the recipe flip labels after carving its validation split."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise={noise}: the flipped fraction must be in [0, 0.5) for the labels to stay learnable")
    if n_train < 1 or n_dev < 1:
        raise ValueError(f"n_train={n_train}, n_dev={n_dev}: both splits need at least one example")
    rng = random.Random(f"hiddenkey-ds-demo-{seed}")
    seen: set[str] = set()

    def fresh(idx: int) -> tuple[str, int]:
        want = idx % 2  # balanced labels (before the flips): chance is 50%
        for _ in range(10_000):
            text, label = _review(rng)
            if label == want and text not in seen:
                seen.add(text)
                return text, label
        raise ValueError("the review generator ran out of distinct sentences; ask for fewer examples")

    train = []
    flipped = set(rng.sample(range(n_train), round(noise * n_train)))  # an exact fraction, not a random count
    for idx in range(n_train):
        text, label = fresh(idx)
        noisy = idx in flipped
        train.append({"sentence": text, "label": 1 - label if noisy else label, "idx": idx, "noisy": noisy})
    dev = []
    for idx in range(n_dev):
        text, label = fresh(idx)
        dev.append({"sentence": text, "label": label, "idx": idx})
    return {"train": train, "validation": dev}


def write_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 128, n_dev: int = 128,
                  noise: float = 0.0) -> Path:
    """Write train.jsonl, dev.jsonl and dataset.yaml (how they were made) into out_dir; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(seed, n_train, n_dev, noise)
    for split, name in (("train", "train.jsonl"), ("validation", "dev.jsonl")):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
    info = {"generator": "hiddenkey_ds.experiments.demo_data", "seed": seed, "n_train": n_train, "n_dev": n_dev,
            "noise": noise, "flipped_train_labels": sum(r["noisy"] for r in rows["train"]),
            "template": "sst2", "labels": {"0": "negative", "1": "positive"}}
    # .yaml, not .json: the data loader reads every *.json(l) in the directory as a split
    (out / "dataset.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    return out
