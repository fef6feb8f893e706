"""lm-eval hooks for the E2E NLG tasks (hk_e2e*): prompt from `hiddenkey_ds.data.e2e`, corpus metrics from
`hiddenkey_ds.evaluation.nlg_metrics`.

A document is one meaning representation with all its references (`{"mr", "refs", "idx"}`); the model continues
`e2e_prompt(mr)` (the training prompt) until a newline or EOS; `process_results` keeps the first line of the
generation, whitespace-collapsed and stripped, and hands `(hypothesis, references)` to the five aggregations, which
score the whole set at once (corpus BLEU/NIST are not means of sentence scores).

Local files (`hk_e2e_local*`): `--metadata '{"e2e_dir": "../shared/data/e2e"}'` (or data_dir=...), a directory
with dev/test JSONL or the official CSVs (hiddenkey_ds.data.e2e.load_dir).
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    from hiddenkey_ds.data import e2e as _e2e
except ImportError:  # a checkout used without `pip install -e .`: the package sits two folders up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from hiddenkey_ds.data import e2e as _e2e
from hiddenkey_ds.evaluation import nlg_metrics as _metrics

HUB_ID = "tuetschek/e2e_nlg"


def _dataset(records):
    import datasets

    return datasets.Dataset.from_list([{"mr": r.mr, "refs": list(r.refs), "idx": r.idx} for r in records])


def load_e2e_local(**metadata):
    """custom_dataset: the directory's splits as a DatasetDict of grouped records (the test split is scored)."""
    import datasets

    data_dir = metadata.get("e2e_dir") or metadata.get("data_dir")
    if not data_dir:
        raise ValueError("hk_e2e_local reads local files: give their directory with lm-eval's task metadata, e.g. "
                         "--metadata '{\"e2e_dir\": \"../shared/data/e2e\"}' (or data_dir=...)")
    splits = _e2e.load_dir(data_dir)
    if "test" not in splits:
        raise FileNotFoundError(f"{data_dir}: no test split (test.jsonl or testset_w_refs.csv) to score")
    return datasets.DatasetDict({name: _dataset(records) for name, records in splits.items()})


def process_docs_hub(dataset):
    """The hub copy has one row per reference: one document per MR instead."""
    return _dataset(_e2e.from_hub(dataset, HUB_ID))


def doc_to_text(doc) -> str:
    return _e2e.e2e_prompt(doc["mr"])


def doc_to_target(doc) -> str:
    # only few-shot examples show it; the metrics read every reference from process_results
    return " " + doc["refs"][0]


def postprocess(generation: str) -> str:
    """First line of the generation (the stop sequences usually cut there already), whitespace collapsed."""
    lines = generation.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def process_results(doc, results):
    item = (postprocess(results[0]), list(doc["refs"]))
    return {name: item for name in _metrics.METRICS}


def _aggregation(name):
    def aggregate(items):
        hyps, refs = zip(*items)
        return _metrics.METRICS[name](list(hyps), [list(r) for r in refs])

    aggregate.__name__ = f"agg_{name}"
    return aggregate


agg_bleu, agg_nist, agg_meteor, agg_rouge_l, agg_cider = (_aggregation(n) for n in
                                                          ("bleu", "nist", "meteor", "rouge_l", "cider"))
