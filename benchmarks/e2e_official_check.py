"""Our E2E metrics (hiddenkey_ds.evaluation.nlg_metrics) beside the official e2e-metrics code, on one system.

    git clone https://github.com/tuetschek/e2e-metrics /tmp/e2e-metrics
    python benchmarks/e2e_official_check.py /tmp/e2e-metrics [--data ../shared/data/e2e]

Needs perl with XML::Twig (Debian: libxml-twig-perl) for mteval-v13a-sig.pl. The "system" is synthetic: each test
MR's first reference with every 4th word dropped, some upper-cased 3-word and some empty outputs, scored against
the MR's other references. BLEU and NIST come from the official Perl (as measure_scores.py runs it). With java and
the checkout's jars (git-lfs, or the same files from PyPI's pycocoevalcap wheel: meteor-1.5.jar,
data/paraphrase-en.gz, stanford-corenlp-3.4.1.jar) METEOR, ROUGE-L and CIDEr come from measure_scores.py's own COCO
evaluation, and the PTB tokens of every reference are compared with ours; without them, ROUGE-L and CIDEr come from
pycocoevalcap's Rouge/Cider fed our tokens (the formulas only). Prints JSON: ours, official, pymteval (e2e-metrics'
Python BLEU/NIST, whose NIST differs from the Perl's) and the tokenization agreement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official", type=Path, help="a checkout of github.com/tuetschek/e2e-metrics")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "e2e")
    parser.add_argument("--system", choices=("degraded", "reference"), default="degraded",
                        help="degraded (default, above) or reference: each MR's first reference as the output")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from hiddenkey_ds.data import e2e
    from hiddenkey_ds.evaluation import nlg_metrics as m

    # the official code's py2 shims and its imports we do not run (COCO loader, Java-backed evaluator)
    past, utils = types.ModuleType("past"), types.ModuleType("past.utils")
    utils.old_div = lambda a, b: a / b
    past.utils = utils
    sys.modules.update({"past": past, "past.utils": utils})
    jars = [args.official / "pycocoevalcap" / "meteor" / "meteor-1.5.jar",
            args.official / "pycocoevalcap" / "meteor" / "data" / "paraphrase-en.gz",
            args.official / "pycocoevalcap" / "tokenizer" / "stanford-corenlp-3.4.1.jar"]
    with_java = shutil.which("java") is not None and all(j.is_file() and j.stat().st_size > 1000 for j in jars)
    stubs = ("skimage", "skimage.draw") if with_java else ("pycocotools", "pycocotools.coco", "pycocoevalcap.eval")
    for name in stubs:  # pycocotools.coco imports skimage for masks the captions never use
        stub = types.ModuleType(name)
        stub.COCO = stub.COCOEvalCap = stub.polygon = None
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
        if args.system == "reference":
            hyp = record.refs[0]
        elif k % 50 == 0:
            hyp = ""
        elif k % 7 == 0:
            hyp = " ".join(words[:3]).upper()
        hyps.append(hyp)
        refs.append(list(record.refs[1:]) or list(record.refs))

    ours = m.all_metrics(hyps, refs)
    os.chdir(args.official)
    official = measure_scores.run_mteval(refs, hyps, [""] * len(hyps))
    agreement = None
    if with_java:
        official.update({k: float(v) for k, v in measure_scores.run_coco_eval(refs, hyps).eval.items()})
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer().tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
        same = sum(" ".join(m.coco_tokenize(r)) == t for i, rs in enumerate(refs) for r, t in zip(rs, ptb[i]))
        agreement = f"{same}/{sum(map(len, refs))} references tokenized as PTBTokenizer does"
    else:
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
    print(json.dumps({"ours": ours, "official": official, "pymteval": {"BLEU": bleu.score(), "NIST": nist.score()},
                      "tokenization": agreement}, indent=1))


if __name__ == "__main__":
    main()
