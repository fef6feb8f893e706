"""The five E2E metrics (hiddenkey_ds.evaluation.nlg_metrics) against values computed by hand.

Fixture (no punctuation and lowercase, so mteval's and the COCO tokenizations both give the words):
  H1 "the cat sat on the mat"  refs "the cat sat on a mat" | "a cat is on the mat"
  H2 "a dog barks"             refs "the dog barks loudly" | "a dog is barking"
"""
from __future__ import annotations

import math

import pytest

from hiddenkey_ds.evaluation import nlg_metrics as m

HYPS = ["the cat sat on the mat", "a dog barks"]
REFS = [["the cat sat on a mat", "a cat is on the mat"], ["the dog barks loudly", "a dog is barking"]]


def test_bleu_by_hand():
    # clipped matches / candidate n-grams, summed over both segments:
    #   1-grams: H1 the(clipped to 1),cat,sat,on,mat = 5/6; H2 a,dog,barks = 3/3      -> 8/9
    #   2-grams: H1 the cat,cat sat,sat on (ref 1),on the,the mat (ref 2) = 5/5; H2 a dog,dog barks = 2/2 -> 7/7
    #   3-grams: H1 the cat sat,cat sat on,on the mat = 3/4 (not "sat on the"); H2 0/1  -> 3/5
    #   4-grams: H1 the cat sat on = 1/3; H2 has none                                   -> 1/3
    # closest reference lengths 6 (H1, 6 words) and 4 (H2, 3 words): r = 10, c = 9, BP = exp(1 - 10/9)
    expected = math.exp(1 - 10 / 9) * (8 / 9 * 7 / 7 * 3 / 5 * 1 / 3) ** 0.25  # 0.58105
    assert m.bleu(HYPS, REFS) == pytest.approx(expected, abs=1e-9)
    # a zero n-gram count is smoothed as mteval does: the k-th zero becomes 1/2^k matches
    #   "a dog barks" alone: p = 3/3, 2/2, (1/2)/1; no 4-gram in the candidate at all -> mteval's log term 0
    #   closest ref length 4 -> BP exp(1 - 4/3)
    assert m.bleu(HYPS[1:], REFS[1:]) == pytest.approx(math.exp(1 - 4 / 3) * (0.5) ** 0.25, abs=1e-9)


def test_bleu_brevity_penalty_takes_the_closest_reference_ties_to_the_shorter():
    # "a cat is on mat" (5 words): 1-grams 5/5, 2-grams 3/4 (not "on mat"), 3-grams 2/3, 4-grams 1/2
    precisions = (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    # refs of 2 and 6 words: the closest is 6 (not the shortest, 2) -> BP exp(1 - 6/5)
    got = m.bleu(["a cat is on mat"], [["a cat", "a cat is on the mat"]])
    assert got == pytest.approx(math.exp(1 - 6 / 5) * precisions, abs=1e-9)
    # refs of 4 and 6 words are equally close: the shorter counts -> r = 4 < c = 5, BP 1
    got = m.bleu(["a cat is on mat"], [["a cat is on", "a cat is on the mat"]])
    assert got == pytest.approx(precisions, abs=1e-9)


def test_bleu_agrees_with_sacrebleu_except_without_any_4gram():
    """sacrebleu (13a, "exp" smoothing) is the same BLEU, but scores 0 where no candidate has a 4-gram."""
    from sacrebleu.metrics import BLEU

    streams = [[r[i] for r in REFS] for i in range(2)]
    sacre = BLEU(tokenize="13a", smooth_method="exp", lowercase=True)
    assert m.bleu(HYPS, REFS) == pytest.approx(sacre.corpus_score(HYPS, streams).score / 100, abs=1e-9)
    assert sacre.corpus_score(HYPS[1:], [s[1:] for s in streams]).score == 0.0


def test_bleu_is_case_insensitive_and_tokenizes_like_mteval():
    assert m.mteval_tokenize("Near £20-25, It's OK.") == ["near", "£20", "-", "25", ",", "it's", "ok", "."]
    assert m.bleu(["THE Cat sat on the mat."], [["the cat sat on the mat ."]]) == pytest.approx(1.0)


def test_nist_by_hand():
    # information weights from all 4 references (20 words): info(w) = log2(20 / count(w)) for unigrams,
    # info(xy) = log2(count(x) / count(xy)) for longer n-grams. counts: the 3, a 3, cat 2, on 2, mat 2, is 2, dog 2,
    # sat 1, barks 1; every bigram occurs once, so trigram and longer weights are log2(1/1) = 0.
    uni = 2 * math.log2(20 / 3) + 4 * math.log2(10) + 2 * math.log2(20)  # the,a; cat,on,mat,dog; sat,barks
    bi = 3 * math.log2(3) + 3 * math.log2(2) + 0  # the cat,the mat,a dog; cat sat,on the,dog barks; sat on
    score = uni / 9 + bi / 7  # candidate 1-grams 9, 2-grams 7; 3..5-grams add 0
    # length penalty: 9 words against the average reference length 20 / (4 refs / 2 segments) = 10
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = score * math.exp(-beta * math.log(0.9) ** 2)  # 3.96301
    assert m.nist(HYPS, REFS) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(3.96301, abs=1e-5)


def test_nist_length_penalty_uses_mtevals_average_reference_length():
    # MRs with 1 and 2 references: ref words 4 + (2 + 3) = 9; mteval's average reference length is
    # 9 / (3 refs / 2 MRs) = 6 (e2e-metrics' pymteval would use 4 + 5/2 = 6.5). Candidate words 3 -> ratio 1/2.
    # counts over the 9 reference words: a 1, b 1, c 3; matched a, b, c -> log2(9) + log2(9) + log2(9/3);
    # the matched bigram "a b" weighs log2(count(a) / count(a b)) = 0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = (2 * math.log2(9) + math.log2(3)) / 3 * math.exp(-beta * math.log(0.5) ** 2)
    assert m.nist(["a b", "c"], [["a b c d"], ["c d", "c e f"]]) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_by_hand():
    # H1: LCS with ref 1 = 5 (the cat sat on mat), with ref 2 = 4 -> P = R = 5/6 -> F = 5/6
    # H2: LCS 2 with both refs -> P_max = 2/3, R_max = 2/4; F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    f2 = (1 + 1.44) * (2 / 3) * (1 / 2) / (1 / 2 + 1.44 * 2 / 3)  # 0.557078
    assert m.rouge_l(HYPS, REFS) == pytest.approx((5 / 6 + f2) / 2, abs=1e-9)


def test_meteor_by_hand():
    # nltk's METEOR with METEOR 1.5's English parameters: Fmean = P R / (0.85 P + 0.15 R),
    # score = Fmean (1 - 0.6 (chunks / matches)^0.2), best reference per hypothesis; exact + Porter-stem matches.
    #   H1 vs ref 1: 5 matches, P = R = 5/6. nltk aligns greedily from the sentence ends, so H1's second "the"
    #                takes ref 1's "the" (ref position 0): chunks "cat sat on" | "the" | "mat" = 3
    #                -> 5/6 (1 - 0.6 (3/5)^0.2) = 0.381893 (METEOR 1.5 would pick the 2-chunk alignment)
    #   H1 vs ref 2: cat | on the mat: 4 matches, 2 chunks -> 2/3 (1 - 0.6 (1/2)^0.2) = 0.318446, lower
    #   H2 vs ref 2: a, dog exact, barks~barking by stem: m = 3, P = 1, R = 3/4, 2 chunks ("a dog" | "barks")
    #                -> 0.75 / (0.85 + 0.1125) (1 - 0.6 (2/3)^0.2) = 0.348105
    #   H2 vs ref 1: dog barks, P 2/3, R 1/2, 1 chunk -> 0.248142, lower
    h1 = 5 / 6 * (1 - 0.6 * (3 / 5) ** 0.2)
    h2 = 0.75 / (0.85 + 0.1125) * (1 - 0.6 * (2 / 3) ** 0.2)
    assert h1 == pytest.approx(0.381893, abs=1e-6) and h2 == pytest.approx(0.348105, abs=1e-6)
    assert m.meteor(HYPS, REFS) == pytest.approx((h1 + h2) / 2, abs=1e-9)


def test_cider_by_hand():
    # doc 1 refs "a b" | "a c", hyp "a b"; doc 2 refs "d e" | "d f", hyp "d g h".
    # Every reference n-gram sits in one document: idf = log(2 docs) - log(max(1, df=1)) = ln 2 for all (and for
    # the unseen g, h: df 0 -> max(1, 0)), so the tf-idf cosines are the plain tf cosines.
    #   doc 1: vs "a b": 1-gram cos 1, 2-gram cos 1; vs "a c": 1-gram 1/2, 2-gram 0; 3,4-grams empty -> 0
    #          (1 + 1 + 0.5) / 4 n-gram orders / 2 refs * 10 = 3.125
    #   doc 2: vs either ref: 1-gram cos 1/sqrt(3 * 2), no common 2-gram; length (bigram count) 2 vs 1 ->
    #          Gaussian penalty exp(-1 / (2 * 6^2))
    doc2 = 2 * (1 / math.sqrt(6)) * math.exp(-1 / 72) / 4 / 2 * 10  # 1.006543
    got = m.cider(["a b", "d g h"], [["a b", "a c"], ["d e", "d f"]])
    assert got == pytest.approx((3.125 + doc2) / 2, abs=1e-9)
    # an n-gram in every document's references weighs nothing: "x" is in both, so only "y"/"z" count
    assert m.cider(["x y", "x z"], [["x y"], ["x z"]]) == pytest.approx(
        # 1-gram cos 1 (only y resp. z carries weight), 2-gram cos 1 -> (1 + 1) / 4 * 10
        5.0, abs=1e-9)


def test_identities():
    refs = REFS
    exact = [r[0] for r in refs]
    assert m.bleu(exact, refs) == pytest.approx(1.0)
    assert m.rouge_l(exact, refs) == pytest.approx(1.0)
    # METEOR's best: one chunk, fragmentation penalty 0.6 (1/m)^0.2 with m = 6 and 4 words (METEOR 1.5 too gives
    # an exact short sentence less than 1)
    assert m.meteor(exact, refs) == pytest.approx(((1 - 0.6 / 6 ** 0.2) + (1 - 0.6 / 4 ** 0.2)) / 2)
    empty = ["", ""]
    assert m.all_metrics(empty, refs) == {"bleu": 0.0, "nist": 0.0, "meteor": 0.0, "rouge_l": 0.0, "cider": 0.0}
    # a better hypothesis never scores lower than a worse one
    worse = ["a mat", "the dog"]
    for name, score in m.all_metrics(HYPS, refs).items():
        assert score > m.METRICS[name](worse, refs), name


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        m.bleu(HYPS, REFS[:1])
    with pytest.raises(ValueError, match="no non-empty reference"):
        m.cider(HYPS, [REFS[0], [""]])


def test_coco_tokenization_follows_ptb_on_e2e_constructs():
    # PTBTokenizer 3.4.1 (the official's jar) on these: "#" for the pound sign, quotes/periods/dashes split off and
    # dropped with pycocoevalcap's punctuation list
    assert m.coco_tokenize("Blue Spice, near the £20-25. It's (ok).") == [
        "blue", "spice", "near", "the", "#", "20-25", "it", "'s", "ok"]
    assert m.coco_tokenize("Known as 'average' , .Blue in the £20-£25 range, non- child friendly..") == [
        "known", "as", "average", "blue", "in", "the", "#", "20", "#", "25", "range", "non", "child", "friendly"]
