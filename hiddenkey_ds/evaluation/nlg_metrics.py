"""Corpus-level multi-reference NLG metrics computed as the official E2E NLG scripts compute them.

The official scorer (github.com/tuetschek/e2e-metrics, `measure_scores.py`) runs two toolkits:

* BLEU and NIST: `mteval-v13a-sig.pl` (Perl) on the raw strings: its v11b/13a tokenization with ASCII
  lowercasing, BLEU-4 with the "closest reference length" brevity penalty (ties go to the shorter reference) and the
  NIST geometric smoothing (the k-th zero n-gram count becomes 1/2^k), NIST-5 with information weights counted over
  every reference of the evaluated set and its length penalty against the average reference length.
* METEOR, ROUGE-L, CIDEr: the MS-COCO caption code (pycocoevalcap) after Stanford's PTB tokenizer (`-lowerCase`,
  punctuation tokens removed).

Every function takes `hyps: list[str]` and `refs: list[list[str]]` (one list of references per hypothesis, any
number each) and returns the score on the official scripts' scale (BLEU, METEOR, ROUGE-L in [0, 1]; NIST and CIDEr
unbounded). docs/evaluation.md lists exactly where each one matches the official code and where it does not.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu", "nist", "meteor", "rouge_l", "cider", "all_metrics", "METRICS", "METEOR_15_EN", "mteval_tokenize",
           "coco_tokenize"]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _check(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    empty = [i for i, r in enumerate(refs) if not any(x.strip() for x in r)]
    if empty:
        raise ValueError(f"hypotheses {empty[:5]} have no non-empty reference")


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's default tokenization; `tr/[A-Z]/[a-z]/` there lowercases ASCII letters only."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.translate(_ASCII_LOWER)).split()


# PTBTokenizer's punctuation tokens that pycocoevalcap drops (ptbtokenizer.PUNCTUATIONS), plus the brackets as nltk
# leaves them (PTB writes them -LRB- ...).
_COCO_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", "(", ")", "{", "}",
               ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def coco_tokenize(text: str) -> list[str]:
    """An approximation of Stanford PTBTokenizer 3.4.1 `-lowerCase` (Java; the official runs its jar) followed by
    pycocoevalcap's punctuation removal: nltk's Treebank tokenizer after the rewrites below, each one a place where
    the two differ on E2E references (benchmarks/e2e_official_check.py counts the agreement)."""
    from nltk.tokenize import TreebankWordTokenizer

    text = text.replace("\n", " ")
    text = text.replace("£", " # ")  # PTB 3.4.1 writes the pound sign as "#" (the Penn Treebank's convention)
    text = re.sub(r"-(?=\s*[#$])", " - ", text)  # "£20-£25": the dash before a currency sign is a token
    text = re.sub(r"(?<=\w)-(?=\s)|(?<!\S)-(?=\w)", " - ", text)  # "non- child", "family -friendly"
    text = re.sub(r"(?<=\w)\.\.(?=\s|$)", " . . ", text)  # "friendly.." (PTB: two periods)
    text = re.sub(r"(?<![\s.])\.(?=\s)", " .", text)  # a sentence-internal period ends a word (nltk: string-final only)
    text = re.sub(r"(?<!\S)\.(?=[^\s.])", ". ", text)  # ", .Blue Spice": a word-initial period is its own token
    text = re.sub(r"(?<!\S)'(?=\w)", "' ", text)  # an opening single quote is a token (PTB: `)
    return [t for t in TreebankWordTokenizer().tokenize(text.lower()) if t not in _COCO_PUNCT]


def _ngrams(tokens: Sequence[str], n_max: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------------------------------------------- BLEU / NIST


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-4 as mteval-v13a's `bleu_score` computes it (its default, smoothed variant).

    Written out rather than taken from sacrebleu, which agrees (same 13a tokenizer, same "exp" smoothing) except
    where a corpus has no candidate n-gram of some order at all: mteval counts that order's log-precision as 0,
    sacrebleu scores the corpus 0 (tests/test_nlg_metrics.py checks both facts).
    """
    _check(hyps, refs)
    matches = [0] * (max_n + 1)
    totals = [0] * (max_n + 1)
    ref_len = 0
    for hyp, rs in zip(hyps, refs):
        h = mteval_tokenize(hyp)
        toks = [mteval_tokenize(r) for r in rs if r.strip()]
        ref_max: Counter = Counter()
        for r in toks:
            ref_max |= _ngrams(r, max_n)  # Counter union = element-wise max: the clipping count
        for gram, c in _ngrams(h, max_n).items():
            matches[len(gram)] += min(c, ref_max[gram])
        for n in range(1, max_n + 1):
            totals[n] += max(len(h) - n + 1, 0)
        # closest reference length, ties to the shorter one (brevity_penalty_closest)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in toks)[1]
    if totals[1] == 0:
        return 0.0
    log_sum, smooth = 0.0, 1
    for n in range(1, max_n + 1):
        if totals[n] == 0:
            continue
        if matches[n] == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * totals[n]))
        else:
            log_sum += math.log(matches[n] / totals[n])
    return math.exp(log_sum / max_n + min(0.0, 1 - ref_len / totals[1]))


_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def nist(hyps: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST-5 as mteval-v13a computes it (`compute_ngram_info`, `score_segment`, `nist_score`)."""
    _check(hyps, refs)
    tok_refs = [[mteval_tokenize(r) for r in rs if r.strip()] for rs in refs]
    counts: Counter = Counter()
    total_words = 0
    for rs in tok_refs:
        for r in rs:
            total_words += len(r)
            counts.update(_ngrams(r, max_n))

    def info(gram: tuple[str, ...]) -> float:
        parent = counts[gram[:-1]] if len(gram) > 1 else total_words
        return -math.log2(counts[gram] / parent)

    tst_info = [0.0] * (max_n + 1)
    tst_count = [0] * (max_n + 1)
    ref_words = n_refs = 0
    for hyp, rs in zip(hyps, tok_refs):
        h = mteval_tokenize(hyp)
        ref_max: Counter = Counter()
        for r in rs:
            ref_max |= _ngrams(r, max_n)  # Counter union = element-wise max: the clipping count
        for gram, c in _ngrams(h, max_n).items():
            if gram in ref_max:
                tst_info[len(gram)] += info(gram) * min(c, ref_max[gram])
        for n in range(1, max_n + 1):
            tst_count[n] += max(len(h) - n + 1, 0)
        ref_words += sum(len(r) for r in rs)
        n_refs += len(rs)
    score = sum(tst_info[n] / max(tst_count[n], 1) for n in range(1, max_n + 1))
    # mteval's average reference length: all reference words over the mean number of references per segment
    ratio = tst_count[1] / (ref_words / (n_refs / len(hyps)))
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        penalty = math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return score * penalty


# ------------------------------------------------------------------------------------------ METEOR / ROUGE-L / CIDEr


# METEOR 1.5's tuned English parameters (Denkowski & Lavie 2014; `-l en`), in nltk's formula
# Fmean = P R / (alpha P + (1 - alpha) R), penalty = gamma (chunks / matches)^beta
METEOR_15_EN = {"alpha": 0.85, "beta": 0.2, "gamma": 0.6}


class _NoSynonyms:
    """A WordNet stand-in without synsets: METEOR's exact and stem stages only (see meteor())."""

    @staticmethod
    def synsets(*_args, **_kwargs):
        return []


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]], wordnet=None) -> float:
    """Mean of nltk's sentence METEOR (best reference per hypothesis) on the COCO tokenization, with METEOR 1.5's
    English parameters (alpha 0.85, beta 0.2, gamma 0.6) instead of nltk's METEOR 1.0 defaults (0.9, 3, 0.5),
    which put scores on another scale (0.80 instead of 0.43 for E2E test references against each other).

    Exact and Porter-stem matches only unless `wordnet` (e.g. `nltk.corpus.wordnet`, whose data is a separate
    download) is given: the score then does not depend on which nltk data a machine happens to have.
    """
    from nltk.translate.meteor_score import meteor_score

    _check(hyps, refs)
    wordnet = wordnet or _NoSynonyms()
    total = 0.0
    for hyp, rs in zip(hyps, refs):
        h = coco_tokenize(hyp)
        if h:
            total += meteor_score([coco_tokenize(r) for r in rs], h, preprocess=lambda w: w, wordnet=wordnet,
                                 **METEOR_15_EN)
    return total / len(hyps)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """pycocoevalcap's Rouge: per hypothesis, the maximum LCS precision and the maximum LCS recall over its
    references (each maximum on its own) combined as F_beta with beta 1.2, averaged over hypotheses."""
    _check(hyps, refs)
    total = 0.0
    for hyp, rs in zip(hyps, refs):
        h = coco_tokenize(hyp)
        if not h:
            continue
        lcs = [(_lcs(r, h), len(r)) for r in map(coco_tokenize, rs) if r]
        prec = max(m / len(h) for m, _ in lcs)
        rec = max(m / n for m, n in lcs)
        if prec and rec:
            total += (1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec)
    return total / len(hyps)


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """pycocoevalcap's Cider (in fact CIDEr-D: clipped tf-idf, Gaussian length penalty, x10), document frequencies
    from the references of the evaluated set, as `CiderScorer.compute_score` does."""
    _check(hyps, refs)
    tok_hyps = [coco_tokenize(h) for h in hyps]
    tok_refs = [[coco_tokenize(r) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in tok_refs:
        df.update({g for r in rs for g in _ngrams(r, n)})
    log_docs = math.log(len(hyps))

    def vector(tokens):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in _ngrams(tokens, n).items():
            w = tf * (log_docs - math.log(max(1.0, df[gram])))
            vec[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        # pycocoevalcap's "length" counts *bigrams* (`if n == 1` on a 0-based n-gram index): kept as is
        length = max(len(tokens) - 1, 0)
        return vec, [math.sqrt(x) for x in norm], length

    total = 0.0
    for h, rs in zip(tok_hyps, tok_refs):
        vh, nh, lh = vector(h)
        score = 0.0
        for r in rs:
            vr, nr, lr = vector(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                score += val * penalty
        total += score / n / len(rs) * 10.0
    return total / len(hyps)


METRICS = {"bleu": bleu, "nist": nist, "meteor": meteor, "rouge_l": rouge_l, "cider": cider}


def all_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    return {name: fn(hyps, refs) for name, fn in METRICS.items()}
