"""A classification task of the user's own (data.template / data.choices / data.label_field): the template, the
start-up checks, the generated lm-eval task, and (slow) training then scoring it with hiddenkey-ds eval and the
stock lm_eval CLI."""
from __future__ import annotations

import csv
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hiddenkey_ds.config import RecipeError, load_recipe
from hiddenkey_ds.data.templates import TEMPLATES, custom_template, get_template, template_for
from train_runs import REPO

ENV_KEYS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1"}
TOPICS = {"sports": ["goal", "match", "team", "coach", "score"], "music": ["song", "band", "guitar", "album", "singer"],
          "food": ["bread", "soup", "cheese", "recipe", "dinner"], "travel": ["flight", "hotel", "beach", "trip", "train"]}
MOODS = {"good": ["great", "lovely", "fine"], "bad": ["awful", "dull", "poor"], "so-so": ["okay", "average", "plain"]}


def topic_rows(n: int, seed: int, as_names: bool = True) -> list[dict]:
    """A 4-class topic set: two keywords of the class per text; labels as class names or ids."""
    rng, names = random.Random(seed), list(TOPICS)
    out = []
    for _ in range(n):
        k = rng.randrange(len(names))
        a, b = rng.sample(TOPICS[names[k]], 2)
        out.append({"text": f"the {a} and the {b} were there", "topic": names[k] if as_names else k})
    return out


def write_topics(directory: Path, train: int = 160, dev: int = 40) -> Path:
    """CSV files with class names as labels, as docs/recipes.md's worked example has them."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 0), ("dev", dev, 1)):
        with open(directory / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "topic"])
            writer.writeheader()
            writer.writerows(topic_rows(n, seed))
    return directory


def write_moods(directory: Path, train: int = 120, dev: int = 30) -> Path:
    """A 3-class JSONL set with integer labels."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(MOODS)
    for split, n, seed in (("train", train, 2), ("validation", dev, 3)):
        rng = random.Random(seed)
        rows = []
        for i in range(n):
            k = rng.randrange(3)
            rows.append({"review": f"the room was {rng.choice(MOODS[names[k]])}", "stars": k, "id": i})
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


TOPIC_DATA = {"task": "topics", "template": "Text: {text}\nTopic:", "label_field": "topic",
              "choices": {"sports": " sports", "music": " music", "food": " food", "travel": " travel"}}
MOOD_DATA = {"task": "moods", "template": "Review: {review}\nThe stay was", "label_field": "stars",
             "choices": [" good", " bad", " so-so"]}


def custom_recipe(work: Path, data: dict, path: Path, *overrides: str) -> Path:
    """tiny-lora.yaml with a data section of the user's own task."""
    raw = yaml.safe_load((REPO / "recipes" / "tiny-lora.yaml").read_text())
    raw["data"] = {"format": "classification", **data, "path": str(path), "max_length": 64}
    raw["run"]["output_dir"] = str(work / "run")
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    return recipe


# -- the template --------------------------------------------------------------------------------------------------
def test_custom_template_renders_and_reads_ids_and_class_names():
    t = custom_template("topics", TOPIC_DATA["template"], TOPIC_DATA["choices"], "topic")
    assert t.fields == ("text",) and t.choices == (" sports", " music", " food", " travel") and not t.builtin
    doc = {"text": "  the goal and the team ", "topic": "food"}
    assert t.render_prompt(doc) + t.render_answer(doc) == "Text: the goal and the team\nTopic: food"
    assert [t.label_id({"topic": v}) for v in ("sports", 1, "2", 3.0, " travel ")] == [0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match=r"label 4 is not one of 0..3 or \['sports', 'music', 'food', 'travel'\]"):
        t.label_id({"topic": 4})
    listed = custom_template("moods", MOOD_DATA["template"], MOOD_DATA["choices"], "stars")
    assert listed.label_names == ("good", "bad", "so-so") and listed.label_id({"stars": "so-so"}) == 2
    assert listed.fields == ("review",)


def test_builtin_templates_are_unchanged_and_the_recipes_reach_them_through_template_for():
    """The GLUE templates are instances of the same TaskTemplate, reached by the same template_for; their prompts
    and verbalizers are the ones the shipped lm-eval tasks and every earlier score used (pinned)."""
    pinned = {
        "rte": ("{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", (" True", " False")),
        "mrpc": ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same "
                 "thing?\nAnswer:", (" no", " yes")),
        "sst2": ("{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:", (" negative", " positive")),
        "cola": ("{sentence}\nQuestion: Does this sentence make sense?\nAnswer:", (" no", " yes")),
        "qnli": ("{question}\n{sentence}\nQuestion: Does this response answer the question?\nAnswer:", (" yes", " no")),
        "boolq": ("{passage}\nQuestion: {question}?\nAnswer:", (" no", " yes")),
    }
    assert {n: (t.prompt, t.choices) for n, t in TEMPLATES.items()} == pinned
    assert all(t.builtin and t.label_names is None for t in TEMPLATES.values())
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        data = load_recipe(recipe, ["run.output_dir=/nonexistent"], check_output_dir=False).data
        assert template_for(data) is get_template(data.task), recipe.name
    # a hidden GLUE test label is still "unlabelled", dropped by the pipeline, not an error
    with pytest.raises(ValueError, match="unlabelled test splits"):
        get_template("rte").label_id({"label": -1})


# -- start-up checks: one message, exit 2, before the model loads --------------------------------------------------
def _train_cli(recipe: Path, *overrides: str) -> list[str]:
    return ["train", str(recipe), *overrides]


@pytest.mark.parametrize("case, overrides, files, message", [
    ("template-field-missing", ["data.template='Text: {body} Topic:'"], {},
     "data.path: the train split lacks column(s) ['body']"),
    ("label-outside-choices", [], {"bad": 'text,topic\nthe goal,sports\nthe song,jazz\nthe soup,5\n'},
     "data.path: 2 row(s) of the train split have a label outside the choices in column 'topic' ('jazz', '5')"),
    ("choices-twice", ["data.choices=[' sports', ' music', ' sports']"], {},
     "data.choices: choice(s) [' sports'] appear twice"),
    ("one-choice", ["data.choices=[' sports']"], {}, "data.choices: 1 choice(s): a classification task needs"),
    ("template-unquoted", ["data.template={text}"], {}, "data.template: expected a string, got a YAML mapping"),
    ("template-positional", ["data.template='Text: {} Topic:'"], {}, "data.template: a positional field {}"),
    ("template-attribute", ["data.template='Text: {text.upper} Topic:'"], {},
     "data.template: field {text.upper}: only plain column names"),
    ("choices-same-first-token", ["data.choices={sports: ' sports', music: ' so-so', food: ' food', travel: ' travel'}"],
     {}, "data.choices: ' sports' and ' so-so' start with the same token 267 after the prompt"),
    ("builtin-name", ["data.task=rte"], {}, "data.task: task 'rte' is a built-in task, but data.template"),
    ("choices-without-template", ["data.template=null", "data.task=sst2"], {}, "data.choices / data.label_field define a task"),
    ("sft-with-template", ["data.format=sft"], {}, "data.template defines a classification task, but data.format=sft"),
    ("at-end-without-eval-split", ["eval.at_end=true", "data.eval_split=test"], {},
     "holds no file for data.eval_split='test'"),
])
def test_bad_custom_task_is_one_message_exit_2_before_the_model_loads(case, overrides, files, message, tmp_path,
                                                                       capsys, monkeypatch):
    from unittest import mock

    from hiddenkey_ds import cli

    data = write_topics(tmp_path / "topics", train=16, dev=8)
    for name, content in files.items():
        (data / "train.csv").write_text(content)
    recipe = custom_recipe(tmp_path, TOPIC_DATA, data)
    monkeypatch.chdir(tmp_path)
    with mock.patch("hiddenkey_ds.models.loading.load_model", side_effect=AssertionError("model loaded")):
        code = cli.main(_train_cli(recipe, *overrides))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count(message) == 1 and "(hint: " in err and "Traceback" not in out + err, err
    assert not (tmp_path / "run").exists()


def test_choices_one_tokenizer_cannot_tell_apart_are_refused():
    """An uncased tokenizer writes " Yes" and " yes" the same: one class to the loss and to lm-eval."""
    import datasets
    from transformers import AutoTokenizer

    from hiddenkey_ds.data.pipeline import _choice_tokens
    from hiddenkey_ds.models.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))

    def uncased(texts, **kw):
        return tok([t.lower() for t in texts] if isinstance(texts, list) else texts.lower(), **kw)

    train = datasets.Dataset.from_list([{"text": "the goal", "label": 0}])
    t = custom_template("yn", "{text}?", [" Yes", " yes"], "label")
    [problem], _ = _choice_tokens(t, uncased, train)
    assert problem.startswith("data.choices: ' Yes' and ' yes' tokenize to the same ids") and "(hint: " in problem
    assert _choice_tokens(t, tok, train) == ([], [tok(" Yes", add_special_tokens=False)["input_ids"][0], 470])


# -- data and the generated lm-eval task ---------------------------------------------------------------------------
def test_choice_restricted_accuracy_is_the_argmax_among_the_answers_first_tokens():
    """HiddenKeyObjective(choice_ids=...) counts a sequence right when, at its first answer position, the gold
    token has the highest logit among the choices' first tokens; computed here from the model's full logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from hiddenkey_ds.method import DropoutConfig, HiddenKeyObjective
    from hiddenkey_ds.models.loading import resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    objective = HiddenKeyObjective(model, DropoutConfig(), chunk_tokens=3).eval()
    choices = torch.tensor([267, 284, 274, 330])
    ids = torch.randint(5, 800, (6, 10))
    labels = torch.full_like(ids, -100)
    for row, (start, gold) in enumerate([(4, 267), (6, 284), (3, 274), (7, 330), (5, 267), (8, 284)]):
        ids[row, start] = gold
        labels[row, start:start + 2] = ids[row, start:start + 2]  # a two-token answer
    with torch.no_grad():
        out = objective(input_ids=ids, labels=labels, choice_ids=choices)
        logits = model(input_ids=ids).logits
    expected = 0
    for row in range(6):
        first = int((labels[row] != -100).nonzero()[0])
        expected += int(choices[logits[row, first - 1, choices].argmax()] == labels[row, first])
    assert 0 < expected < 6 and int(out.choice_correct) == expected  # neither trivially all nor none
    assert objective(input_ids=ids, labels=labels).choice_correct is None


def test_label_noise_and_carved_validation_on_class_names(tmp_path):
    from transformers import AutoTokenizer

    from hiddenkey_ds.data import build_datasets
    from hiddenkey_ds.models.loading import resolve_model_path

    data = write_topics(tmp_path / "topics", train=100, dev=20)
    recipe = load_recipe(custom_recipe(tmp_path, TOPIC_DATA, data), [
        "data.label_noise=0.2", "data.validation_from_train=20", "data.max_train_examples=null",
        "data.max_eval_examples=null"], check_output_dir=False)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    train, val, report = build_datasets(recipe, tok)
    assert (len(train), len(val), report.splits["train"].labels_flipped) == (80, 20, 16)
    answers = [tok.decode([i for i in row["labels"] if i != -100]) for row in train]
    assert set(answers) <= {" sports", " music", " food", " travel"} and len(set(answers)) == 4


def test_generated_task_scores_the_training_strings_on_the_eval_split(tmp_path, monkeypatch):
    """The generated YAML loads in stock lm-eval; its documents are the eval split's rows, its strings the
    training strings, its targets the label ids; relative data paths are made absolute."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from hiddenkey_ds.evaluation import custom_task

    data_dir = write_moods(tmp_path / "moods")
    (data_dir / "validation.jsonl").write_text((data_dir / "validation.jsonl").read_text()
                                               + json.dumps({"review": "the room was plain", "stars": -1}) + "\n")
    monkeypatch.chdir(tmp_path)  # data.path relative, as a recipe in the data's folder would give it
    recipe = load_recipe(custom_recipe(tmp_path, MOOD_DATA, Path("moods")), check_output_dir=False)
    tasks = custom_task.write_task(recipe.data, tmp_path / "run")
    monkeypatch.chdir(REPO)
    assert sorted(p.name for p in tasks.iterdir()) == ["hk_moods.yaml", "hk_moods_task.py"]
    assert str(data_dir.resolve()) in (tasks / "hk_moods_task.py").read_text()
    task = get_task_dict(["hk_moods"], TaskManager(include_path=str(tasks), include_defaults=False))["hk_moods"]
    docs = list(task.validation_docs())
    assert len(docs) == 30  # the hidden label (-1) row is left out
    template = template_for(recipe.data)
    for doc in docs[:5]:
        target = task.doc_to_target(doc)
        assert target == doc["stars"]
        assert task.doc_to_text(doc) + task.doc_to_choice(doc)[target] == \
            template.render_prompt(doc) + template.render_answer(doc)
    assert task.config.target_delimiter == "" and task.doc_to_choice(docs[0]) == [" good", " bad", " so-so"]


def test_tasks_for_a_custom_recipe(tmp_path):
    from hiddenkey_ds.evaluation import harness

    recipe = load_recipe(custom_recipe(tmp_path, TOPIC_DATA, write_topics(tmp_path / "t", 8, 4)),
                         check_output_dir=False)
    assert harness.tasks_for_recipe(recipe) == (["hk_topics"], {})


# -- end to end ------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~90 s: two tiny trainings, each scored by hiddenkey-ds eval and by the stock lm_eval CLI
@pytest.mark.parametrize("kind", ["3-class-jsonl-ids", "4-class-csv-names"])
def test_custom_task_trains_and_stock_lm_eval_equals_hiddenkey_eval(kind, tmp_path):
    import os

    from train_runs import metrics

    env = {**os.environ, **ENV_KEYS}
    if kind.startswith("3"):
        recipe = custom_recipe(tmp_path, MOOD_DATA, write_moods(tmp_path / "moods"))
        n_eval, choices = 30, 3
    else:
        recipe = custom_recipe(tmp_path, TOPIC_DATA, write_topics(tmp_path / "topics"))
        n_eval, choices = 40, 4
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hiddenkey_ds.train", str(recipe), "train.max_steps=12", "train.eval_every=6",
         "train.save_every=null", "data.label_noise=0.1", "eval.at_end=true"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = metrics(run, "validation")
    assert [m["step"] for m in rows] == [6, 12]
    # the validation accuracy is the verbalizer's choice; the whole-answer argmax stays beside it
    assert all(0.0 <= m["accuracy"] <= 1.0 and "answer_accuracy" in m for m in rows)
    assert len(json.loads((run / "data_report.json").read_text())["choice_first_tokens"]) == choices
    assert json.loads((run / "data_report.json").read_text())["splits"]["train"]["labels_flipped"] > 0
    ours = json.loads((run / "eval" / "results.json").read_text())
    task = ours["hiddenkey_ds"]["tasks"][0]
    assert task == ("hk_moods" if choices == 3 else "hk_topics")
    assert ours["n-samples"][task]["effective"] == n_eval and 0.0 <= ours["results"][task]["acc,none"] <= 1.0
    assert (run / "eval" / "results_best.json").is_file()  # adapter_best from the validation accuracy
    stock = ours["hiddenkey_ds"]["stock_command"]
    assert f"--include_path {run / 'eval' / 'tasks'}" in stock

    # the stock CLI, as printed, from another working directory
    out = tmp_path / "stock"
    proc = subprocess.run(shlex.split(stock) + ["--output_path", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [stock_file] = out.rglob("results_*.json")
    theirs = json.loads(stock_file.read_text())
    assert theirs["results"] == ours["results"] and theirs["n-samples"] == ours["n-samples"]
    # each document is scored over every class's answer
    assert len(ours["configs"][task]["metadata"]["choices"]) == choices
