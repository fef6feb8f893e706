"""Templates, loading, tokenizing (answer never cut, report counts), collator and distributed sampler."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hiddenkey_ds.config import RecipeError
from hiddenkey_ds.data import build_datasets, make_collator, make_sampler
from hiddenkey_ds.data.encoding import IGNORE_INDEX, encode_pair
from hiddenkey_ds.data.templates import SKIPPED, TEMPLATES, get_template
from hiddenkey_ds.data.toy import toy_sst2_rows
from tiny_models import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"


@pytest.fixture(scope="module")
def tok(builtin_cache):
    """The builtin tiny tokenizer, from the session's builtin cache (shared with test_models.py)."""
    from hiddenkey_ds.models.loading import load_tokenizer

    return load_tokenizer(_recipe())


_recipe = tiny_recipe


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- templates ---------------------------------------------------------------------------------------

EXAMPLES = {
    "rte": {"sentence1": "A man sleeps.", "sentence2": "A man rests.", "label": 0},
    "mrpc": {"sentence1": "He left.", "sentence2": "He went away.", "label": 1},
    "sst2": {"sentence": " a gripping film ", "label": 1},
    "cola": {"sentence": "Him went home.", "label": 0},
    "qnli": {"question": "Who wrote it?", "sentence": "It was written by Ann.", "label": 0},
    "boolq": {"passage": "Water boils at 100 C at sea level.", "question": "does water boil at 100 c", "label": 1},
}


def test_every_template_renders_its_example():
    assert set(TEMPLATES) == set(EXAMPLES)
    expected_answers = {"rte": " True", "mrpc": " yes", "sst2": " positive", "cola": " no", "qnli": " yes", "boolq": " yes"}
    for name, template in TEMPLATES.items():
        example = EXAMPLES[name]
        prompt = template.render_prompt(example)
        assert all(str(example[f]).strip() in prompt for f in template.fields)
        assert prompt.endswith("Answer:") and "{" not in prompt
        assert template.render_answer(example) == expected_answers[name]
        assert all(c.startswith(" ") for c in template.choices) and len(set(template.choices)) == len(template.choices)
    assert get_template("rte").render_prompt(EXAMPLES["rte"]) == "A man sleeps.\nQuestion: A man rests. True or False?\nAnswer:"
    assert get_template("sst2").render_prompt(EXAMPLES["sst2"]).startswith("a gripping film\n")  # stripped


def test_template_errors_are_clear():
    with pytest.raises(KeyError, match="known tasks: boolq, cola, mrpc, qnli, rte, sst2"):
        get_template("rtee")
    with pytest.raises(KeyError, match="regression"):
        get_template("STS-B")
    assert "stsb" in SKIPPED and get_template("SST-2").name == "sst2"
    with pytest.raises(ValueError, match="unlabelled test splits"):
        get_template("rte").render_answer({**EXAMPLES["rte"], "label": -1})
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['sentence2'\]"):
        get_template("rte").render_prompt({"sentence1": "x", "label": 0})


# -- encoding ----------------------------------------------------------------------------------------

def test_answer_is_never_truncated():
    prompt, answer = [1] + list(range(10, 30)), [7, 8]  # BOS + 20 prompt tokens, 2 answer tokens
    ids, labels, status = encode_pair(prompt, answer, max_length=8, truncation="left", bos_token_id=1)
    assert status == "truncated" and len(ids) == 8
    assert ids == [1, 25, 26, 27, 28, 29, 7, 8]  # BOS kept, the prompt cut from the left, the answer whole
    assert labels == [IGNORE_INDEX] * 6 + [7, 8]
    assert encode_pair(prompt, answer, 8, "drop", 1)[2] == "too_long"
    # the answer plus BOS leaves no room for a prompt token: dropped rather than cut
    assert encode_pair(prompt, [5] * 7, 8, "left", 1) == (None, None, "too_long")
    ids, labels, status = encode_pair([3, 4], [5], 8, "left", 1)
    assert (ids, labels, status) == ([3, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 5], "ok")


def test_toy_dataset_is_fixed_and_balanced():
    rows = toy_sst2_rows("train")
    assert rows == toy_sst2_rows("train") and len(rows) == 2000 and len(toy_sst2_rows("validation")) == 200
    assert 900 < sum(r["label"] for r in rows) < 1100
    assert rows[0] == {"sentence": "the dialogue was really silly!", "label": 0, "idx": 0}  # pinned: same everywhere


# -- build_datasets ----------------------------------------------------------------------------------

def _rte_dir(tmp_path: Path) -> Path:
    d = tmp_path / "RTE"
    d.mkdir()
    long = "the quick brown fox jumps over the lazy dog " * 20
    train = [{"sentence1": f"Premise {i} is short.", "sentence2": f"Hypothesis {i}.", "label": i % 2, "idx": i}
             for i in range(6)]
    train += [{"sentence1": long, "sentence2": "A fox jumps.", "label": 0, "idx": 6}]  # too long: truncated
    train += [{"sentence1": "No label here.", "sentence2": "None.", "label": -1, "idx": 7}]  # unlabelled
    _jsonl(d / "train.jsonl", train)
    _jsonl(d / "dev.jsonl", train[:3])
    return d


def test_classification_labels_only_the_answer_and_report_counts(tmp_path, tok):
    recipe = _recipe(f"data.path={_rte_dir(tmp_path)}", "data.task=rte", "data.max_length=48",
                     "data.max_train_examples=null", "data.max_eval_examples=null")
    train, evaluation, report = build_datasets(recipe, tok)
    assert (len(train), len(evaluation)) == (7, 3)
    split = report.splits["train"]
    assert (split.rows, split.kept, split.truncated, split.dropped_unlabelled, split.dropped_too_long) == (8, 7, 1, 1, 0)
    assert "1 truncated" in report.summary() and "1 dropped: unlabelled" in report.summary()
    for row, label in zip(train, [0, 1, 0, 1, 0, 1, 0]):
        supervised = [t for t in row["labels"] if t != IGNORE_INDEX]
        n = len(supervised)
        assert row["labels"][:-n] == [IGNORE_INDEX] * (len(row["labels"]) - n)  # only the tail is supervised
        assert row["input_ids"][-n:] == supervised
        assert tok.decode(supervised) == (" True", " False")[label]
        assert len(row["input_ids"]) <= 48 and row["input_ids"][0] == tok.bos_token_id
    truncated = train[6]
    assert len(truncated["input_ids"]) == 48 and tok.decode(truncated["input_ids"]).endswith("A fox jumps. True or False?\nAnswer: True")


def test_drop_mode_and_empty_after_filtering(tmp_path, tok):
    path = _rte_dir(tmp_path)
    recipe = _recipe(f"data.path={path}", "data.task=rte", "data.max_length=48", "data.truncation=drop",
                     "data.max_train_examples=null")
    train, _, report = build_datasets(recipe, tok)
    assert len(train) == 6 and report.splits["train"].dropped_too_long == 1 and report.splits["train"].truncated == 0
    tiny = _recipe(f"data.path={path}", "data.task=rte", "data.max_length=4", "data.truncation=drop")
    with pytest.raises(RecipeError) as info:
        build_datasets(tiny, tok)
    assert info.value.problems[0].startswith("data: the train split is empty after filtering (train: 0 kept of 8")
    assert "raise data.max_length" in info.value.problems[0]


def test_missing_columns_and_paths_are_clear(tmp_path, tok):
    d = tmp_path / "bad"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"text": "x", "label": 0}])
    _jsonl(d / "validation.jsonl", [{"text": "y", "label": 1}])
    with pytest.raises(RecipeError) as info:
        build_datasets(_recipe(f"data.path={d}", "data.task=rte"), tok)
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith(
        "data.path: the train split lacks column(s) ['sentence1', 'sentence2']; it has ['text', 'label']")
    with pytest.raises(RecipeError, match="does not exist .*relative to the working directory"):
        build_datasets(_recipe("data.path=./no/such/dir"), tok)
    _jsonl(d / "train.jsonl", [{"sentence": "x", "label": 0}])
    (d / "validation.jsonl").unlink()
    with pytest.raises(RecipeError, match=r"data.eval_split: split 'validation' not found .* \(available: train\)"):
        build_datasets(_recipe(f"data.path={d}"), tok)
    train, evaluation, _ = build_datasets(_recipe(f"data.path={d}", "data.eval_split=null"), tok)
    assert len(train) == 1 and evaluation is None


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_local_file_formats(tmp_path, tok, suffix):
    import pandas as pd

    frame = pd.DataFrame({"sentence": ["good film", "bad, dull film"], "label": [1, 0]})
    path = tmp_path / f"train{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    train, evaluation, report = build_datasets(_recipe(f"data.path={path}", "data.eval_split=null"), tok)
    assert len(train) == 2 and evaluation is None
    assert sorted(tok.decode([t for t in r["labels"] if t != IGNORE_INDEX]) for r in train) == [" negative", " positive"]


def test_sft_prompt_response_and_chat_messages(tmp_path, tok):
    rows = [{"prompt": "Say hi", "response": "hi there",
             "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
            {"prompt": "Empty", "response": " ",
             "messages": [{"role": "user", "content": "no answer"}]}]
    _jsonl(tmp_path / "sft.jsonl", rows)
    base = ["data.format=sft", "data.task=null", f"data.path={tmp_path / 'sft.jsonl'}", "data.eval_split=null",
            "data.max_train_examples=null"]
    for extra, answer in ([[], "hi there</s>\n"], [["data.messages_field=messages"], "hi there</s>\n"],
                          [["data.chat_template=false"], "hi there</s>"]):
        train, _, report = build_datasets(_recipe(*base, *extra), tok)
        assert len(train) == 1 and report.splits["train"].dropped_invalid == 1
        supervised = [t for t in train[0]["labels"] if t != IGNORE_INDEX]
        assert tok.decode(supervised) == answer
        prompt = tok.decode([t for t, lab in zip(train[0]["input_ids"], train[0]["labels"]) if lab == IGNORE_INDEX])
        assert prompt.endswith("<|assistant|>\n" if "data.chat_template=false" not in extra else "Say hi")


# -- batching ----------------------------------------------------------------------------------------

def test_collator_pads_right_and_masks_padding(tok):
    examples = [{"input_ids": [1, 5, 6], "labels": [-100, -100, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = make_collator(tok, pad_to_multiple_of=4)(examples)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[1, 5, 6, pad], [1, 7, pad, pad]]
    assert batch["labels"].tolist() == [[-100, -100, 6, -100], [-100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_sampler_is_seeded_and_disjoint_across_ranks():
    data = list(range(103))

    def order(rank, seed=7, epoch=0, **kw):
        sampler = make_sampler(data, world_size=4, rank=rank, seed=seed, **kw)
        sampler.set_epoch(epoch)
        return list(sampler)

    shards = [order(r, shuffle=True) for r in range(4)]
    assert shards == [order(r, shuffle=True) for r in range(4)]  # deterministic
    assert all(len(s) == 25 for s in shards)
    assert len(set().union(*map(set, shards))) == 100  # disjoint: the 3 left over are dropped, none repeated
    assert order(0, shuffle=True) != order(0, seed=8, shuffle=True)
    assert order(0, shuffle=True) != order(0, epoch=1, shuffle=True)
    # evaluation: every example once; padding repeats sit at the end of a shard, past num_real
    unshuffled = [list(make_sampler(data, 4, r, seed=0, shuffle=False)) for r in range(4)]
    assert unshuffled[1][:3] == [1, 5, 9] and len(set().union(*map(set, unshuffled))) == 100  # training: no repeats
    samplers = [make_sampler(data, 4, r, seed=0, shuffle=False, drop_last=False) for r in range(4)]
    real = [list(s)[: s.num_real] for s in samplers]
    assert sorted(i for shard in real for i in shard) == data
    assert [s.num_real for s in samplers] == [26, 26, 26, 25] and all(len(list(s)) == 26 for s in samplers)


def test_micro_batch_stream_position_restores_the_remaining_batches_exactly():
    """The data position a checkpoint stores, taken after any number of micro-batches (epoch boundaries inside an
    optimizer step included), gives exactly the batches the uninterrupted stream hands out next."""
    from hiddenkey_ds.data.batching import MicroBatchStream

    data = list(range(58))  # 29 per rank of 2: 7 micro-batches of 4 per epoch, one example left over
    collate = lambda rows: list(rows)  # noqa: E731

    def stream(rank=1):
        return MicroBatchStream(data, make_sampler(data, 2, rank, seed=3, shuffle=True), collate, 4)

    full = stream()
    uninterrupted = [next(full) for _ in range(40)]  # 5 epochs and more
    assert full.batches_per_epoch == 7 and all(len(b) == 4 for b in uninterrupted)
    epochs = [uninterrupted[i:i + 7] for i in range(0, 35, 7)]
    assert all(len(set(sum(e, []))) == 28 for e in epochs) and epochs[0] != epochs[1]  # reshuffled, no repeats
    for taken in range(40):
        first = stream()
        for _ in range(taken):
            next(first)
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        assert [next(resumed) for _ in range(40 - taken)] == uninterrupted[taken:], taken
    # grad_accum 3: the position after each optimizer step is where the next step starts
    grouped, positions = stream(), []
    for _ in range(10):
        [next(grouped) for _ in range(3)]
        positions.append(tuple(grouped.state_dict().values()))
    assert positions[:4] == [(0, 3), (0, 6), (1, 2), (1, 5)]  # step 3 took batch 7 of epoch 0 and two of epoch 1
    with pytest.raises(ValueError, match="outside an epoch of 7"):
        stream().load_state_dict({"epoch": 0, "index": 8})


# -- the real GLUE copy beside the project -----------------------------------------------------------

@pytest.mark.skipif(not (GLUE / "RTE" / "train.jsonl").is_file(),
                    reason="../shared/data/glue is absent (a fresh clone has no ../shared)")
def test_glue_rte_local_directory_loads(tok, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = _recipe("data.path=../shared/data/glue/RTE", "data.task=rte", "data.max_length=512",
                     "data.max_train_examples=null", "data.max_eval_examples=null")
    train, evaluation, report = build_datasets(recipe, tok)
    assert (report.splits["train"].rows, report.splits["eval"].rows) == (2490, 277)
    assert report.splits["train"].kept + report.splits["train"].dropped == 2490
    assert len(evaluation) == report.splits["eval"].kept
    answers = {tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) for row in evaluation.select(range(40))}
    assert answers == {" True", " False"}
