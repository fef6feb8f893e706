"""Our E2E metrics (hiddenkey_ds.evaluation.nlg_metrics) beside the official e2e-metrics code, on one system.

    git clone https://github.com/tuetschek/e2e-metrics /tmp/e2e-metrics
    python benchmarks/e2e_official_check.py /tmp/e2e-metrics [--data ../shared/data/e2e]

Needs perl with XML::Twig (Debian: libxml-twig-perl) for mteval-v13a-sig.pl. The "system" is synthetic: each test
MR's first reference with every 4th word dropped, some upper-cased 3-word and some empty outputs, scored against
the MR's other references. BLEU and NIST come from the official Perl (as measure_scores.py runs it); ROUGE-L and
CIDEr from the official pycocoevalcap Rouge/Cider classes fed *our* tokenization (their PTB tokenizer and METEOR
are Java jars this check does not need), so these two compare the formulas, not the tokenizers. METEOR is ours
only. Prints JSON: ours, official, and e2e-metrics' Python pymteval (whose NIST differs from the Perl's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official", type=Path, help="a checkout of github.com/tuetschek/e2e-metrics")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "e2e")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from hiddenkey_ds.data import e2e
    from hiddenkey_ds.evaluation import nlg_metrics as m

    # the official code's py2 shims and its imports we do not run (COCO loader, Java-backed evaluator)
    past, utils = types.ModuleType("past"), types.ModuleType("past.utils")
    utils.old_div = lambda a, b: a / b
    past.utils = utils
    sys.modules.update({"past": past, "past.utils": utils})
    for name in ("pycocotools", "pycocotools.coco", "pycocoevalcap.eval"):
        stub = types.ModuleType(name)
        stub.COCO = stub.COCOEvalCap = None
        sys.modules[name] = stub
    sys.path.insert(0, str(args.official.resolve()))
    import measure_scores
    from metrics.pymteval import BLEUScore, NISTScore
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = [], []
    for k, record in enumerate(e2e.load_dir(args.data)["test"]):
        words = record.refs[0].split()
        hyp = " ".join(w for i, w in enumerate(words) if i % 4 != 3)
        hyps.append("" if k % 50 == 0 else (" ".join(words[:3]).upper() if k % 7 == 0 else hyp))
        refs.append(list(record.refs[1:]) or list(record.refs))

    ours = m.all_metrics(hyps, refs)
    os.chdir(args.official)
    official = measure_scores.run_mteval(refs, hyps, [""] * len(hyps))
    gts = {i: [" ".join(m.coco_tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(m.coco_tokenize(h))] for i, h in enumerate(hyps)}
    official["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    cider = CiderScorer(n=4, sigma=6.0)
    for i in gts:
        cider += (res[i][0], gts[i])
    official["CIDEr"] = float(cider.compute_score()[0])
    bleu, nist = BLEUScore(), NISTScore()
    for hyp, rs in zip(hyps, refs):
        bleu.append(hyp, rs)
        nist.append(hyp, rs)
    print(json.dumps({"ours": ours, "official": official,
                      "pymteval": {"BLEU": bleu.score(), "NIST": nist.score()}}, indent=1))


if __name__ == "__main__":
    main()
