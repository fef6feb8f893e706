"""E2E NLG: the data layer (hiddenkey_ds.data.e2e), the lm-eval tasks (eval/tasks/e2e.py, hk_e2e*.yaml) and
their agreement with the stock `lm_eval` command."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hiddenkey_ds.data import e2e
from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.evaluation import nlg_metrics
from tests.test_packaging import installed  # noqa: F401  (the wheel-install fixture)

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "eval" / "tasks"
SHARED_E2E = ROOT.parent / "shared" / "data" / "e2e"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
       "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

CSV = ('mr,ref\n'
       '"name[Alimentum], area[city centre]",Alimentum is in the city centre.\n'
       '"name[Alimentum], area[city centre]","In the city centre, there is Alimentum."\n'
       '"name[Aromi], eatType[pub], priceRange[£20-25]",Aromi is a pub costing £20-25.\n'
       '"name[Alimentum], area[city centre]",Alimentum sits in the centre.\n')


def _task_module():
    spec = importlib.util.spec_from_file_location("hk_e2e_task", TASKS / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_and_pairs_one_example_per_reference():
    records = [e2e.E2ERecord("name[A], food[Thai]", ("A serves Thai food.", "Thai  food at A."), 0),
               e2e.E2ERecord("name[B]", ("B.",), 1)]
    assert e2e.e2e_prompt(" name[A], food[Thai] ") == "Table: name[A], food[Thai]\nDescription:"
    assert e2e.pairs(records) == [
        {"prompt": "Table: name[A], food[Thai]\nDescription:", "response": " A serves Thai food."},
        {"prompt": "Table: name[A], food[Thai]\nDescription:", "response": " Thai food at A."},
        {"prompt": "Table: name[B]\nDescription:", "response": " B."}]


def test_official_csv_groups_references_by_mr_in_file_order(tmp_path):
    path = tmp_path / "devset.csv"
    path.write_bytes(b"\xef\xbb\xbf" + CSV.encode())  # with the BOM the official files may carry
    records = e2e.read_csv(path)
    assert [(r.mr, r.refs, r.idx) for r in records] == [
        ("name[Alimentum], area[city centre]",
         ("Alimentum is in the city centre.", "In the city centre, there is Alimentum.", "Alimentum sits in the centre."),
         0),
        ("name[Aromi], eatType[pub], priceRange[£20-25]", ("Aromi is a pub costing £20-25.",), 1)]
    assert len(e2e.pairs(records)) == 4
    # a directory of official CSVs: devset.csv -> validation, testset_w_refs.csv -> test
    (tmp_path / "testset_w_refs.csv").write_text(CSV)
    splits = e2e.load_dir(tmp_path)
    assert sorted(splits) == ["test", "validation"] and splits["test"] == records


def test_bad_files_are_recipe_errors(tmp_path):
    bad = tmp_path / "a.csv"
    bad.write_text("mr,text\nname[A],A.\n")
    with pytest.raises(RecipeError, match=r"missing column\(s\) \['ref'\].*hint: the official E2E CSVs"):
        e2e.read_csv(bad)
    bad.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        e2e.read_csv(bad)
    bad.write_bytes("mr,ref\nname[A],caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8.*hint: re-encode"):
        e2e.read_csv(bad)
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"mr": "name[A]", "refs": ["A."], "idx": 0}\n{"mr": "name[B]"}\n')
    with pytest.raises(RecipeError, match=r"dev.jsonl:2: missing field\(s\) \['refs'\]"):
        e2e.read_jsonl(jsonl)
    jsonl.write_text('{"mr": "name[A]", "refs": [" "], "idx": 0}\n')
    with pytest.raises(RecipeError, match="no reference"):
        e2e.read_jsonl(jsonl)
    with pytest.raises(RecipeError, match="holds no E2E file"):
        e2e.load_dir(_empty_dir(tmp_path))
    with pytest.raises(RecipeError, match="does not exist"):
        e2e.load_dir(tmp_path / "missing")


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_hub_field_mapping_on_in_memory_datasets():
    import datasets

    original = datasets.Dataset.from_dict({  # tuetschek/e2e_nlg: one row per reference
        "meaning_representation": ["name[A]", "name[A]", "name[B]"],
        "human_reference": ["A one.", "A two.", "B one."]})
    assert [(r.mr, r.refs) for r in e2e.from_hub(original)] == [("name[A]", ("A one.", "A two.")),
                                                                 ("name[B]", ("B one.",))]
    gem = datasets.Dataset.from_dict({  # GEM/e2e_nlg test rows: target + every reference of the MR
        "gem_id": ["e2e-test-0", "e2e-test-1", "e2e-test-2"],
        "meaning_representation": ["name[A]", "name[A]", "name[B]"],
        "target": ["A one.", "A two.", "B one."],
        "references": [["A one.", "A two."], ["A one.", "A two."], ["B one."]]})
    assert [(r.mr, r.refs) for r in e2e.from_hub(gem, "GEM/e2e_nlg")] == [("name[A]", ("A one.", "A two.")),
                                                                         ("name[B]", ("B one.",))]
    gem_train = gem.remove_columns("references")  # GEM's train split: target only
    assert e2e.from_hub(gem_train, "GEM/e2e_nlg")[0].refs == ("A one.", "A two.")
    with pytest.raises(RecipeError, match=r"missing column\(s\) \['human_reference'\]"):
        e2e.from_hub(gem)
    # the hub task's process_docs turns the per-reference rows into one document per MR
    docs = _task_module().process_docs_hub(original)
    assert docs.to_list() == [{"mr": "name[A]", "refs": ["A one.", "A two."], "idx": 0},
                              {"mr": "name[B]", "refs": ["B one."], "idx": 1}]


def test_carve_validation_by_mr():
    records = [e2e.E2ERecord(f"name[{i}]", (f"r{i}a", f"r{i}b"), i) for i in range(20)]
    train, val = e2e.carve_validation(records, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert not {r.mr for r in train} & {r.mr for r in val}
    assert e2e.carve_validation(records, 0.1, seed=3) == (train, val)  # seeded
    assert e2e.carve_validation(records, 0.1, seed=4)[1] != val
    # every reference of a held-out MR is held out: no training pair shows a validation MR
    assert not {p["prompt"] for p in e2e.pairs(train)} & {p["prompt"] for p in e2e.pairs(val)}
    with pytest.raises(RecipeError, match="not in \\(0, 1\\)"):
        e2e.carve_validation(records, 1.0)


@pytest.mark.skipif(not SHARED_E2E.is_dir(), reason=f"{SHARED_E2E} (the E2E dev/test JSONL) is absent")
def test_shared_e2e_files():
    splits = e2e.load_dir(SHARED_E2E)
    assert sorted(splits) == ["test", "validation"]
    dev, test = splits["validation"], splits["test"]
    assert (len(dev), sum(len(r.refs) for r in dev)) == (547, 4672)
    assert (len(test), sum(len(r.refs) for r in test)) == (630, 4693)
    assert len(e2e.pairs(dev)) == 4672


def test_task_yamls_decoding_and_postprocessing():
    template = yaml.safe_load((TASKS / "_e2e_template_yaml").read_text().replace("!function", ""))
    assert template["output_type"] == "generate_until" and template["test_split"] == "test"
    assert template["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "num_beams": 1,
                                             "length_penalty": 1.0, "max_gen_toks": 160}
    assert [m["metric"] for m in template["metric_list"]] == list(nlg_metrics.METRICS)
    for name in ("hk_e2e_gpt2", "hk_e2e_local_gpt2"):
        gpt2 = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
        assert gpt2["task"] == name
        assert {k: gpt2["generation_kwargs"][k] for k in ("num_beams", "length_penalty", "no_repeat_ngram_size")} \
            == {"num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4}
    task = _task_module()
    doc = {"mr": "name[A], food[Thai]", "refs": ["A serves Thai food.", "Thai food at A."], "idx": 0}
    # the prompt lm-eval generates from is the one training pairs use
    assert task.doc_to_text(doc) == e2e.pairs([e2e.E2ERecord(doc["mr"], ("x",), 0)])[0]["prompt"]
    assert task.postprocess("  A serves  Thai food.\nTable: name[B]") == "A serves Thai food."
    assert task.postprocess("\n\n") == ""
    out = task.process_results(doc, [" A serves Thai food.\nmore"])
    assert set(out) == set(nlg_metrics.METRICS) and out["bleu"] == ("A serves Thai food.", doc["refs"])
    items = [out["bleu"], ("Thai food.", ["Thai food at A."])]
    assert task.agg_bleu(items) == pytest.approx(nlg_metrics.bleu(["A serves Thai food.", "Thai food."],
                                                                   [doc["refs"], ["Thai food at A."]]))
    assert task.agg_cider(items) == nlg_metrics.cider(*zip(*items))


def test_local_task_without_directory_says_how_to_give_it():
    from lm_eval.tasks import TaskManager, get_task_dict

    with pytest.raises(ValueError, match="e2e_dir"):
        get_task_dict(["hk_e2e_local"], TaskManager(include_path=str(TASKS), include_defaults=False, metadata={}))


@pytest.mark.slow  # ~100 s: a tiny model generates for 4 MRs twice (greedy and beam 10), in-process and by the CLI
@pytest.mark.skipif(not SHARED_E2E.is_dir(), reason=f"{SHARED_E2E} (the E2E dev/test JSONL) is absent")
def test_stock_lm_eval_cli_equals_python_api(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hiddenkey_ds.models.loading import resolve_model_path

    model = resolve_model_path("builtin:tiny-llama")
    margs = f"pretrained={model},dtype=float32"
    tasks = ["hk_e2e_local", "hk_e2e_local_gpt2"]
    metadata = {"e2e_dir": str(SHARED_E2E)}
    ours = lm_eval.simple_evaluate(model="hf", model_args=margs, tasks=tasks, limit=4, batch_size=4, device="cpu",
                                   task_manager=TaskManager(include_path=str(TASKS), metadata=metadata),
                                   log_samples=True)
    # the decoding settings reach generate: the gpt2 variant's requests carry beam 10 etc.
    [args] = {json.dumps(s["arguments"][0][1], sort_keys=True) for s in ours["samples"]["hk_e2e_local_gpt2"]}
    assert json.loads(args)["num_beams"] == 10 and json.loads(args)["no_repeat_ngram_size"] == 4
    assert len(ours["samples"]["hk_e2e_local"]) == 4
    cmd = ["lm_eval", "--model", "hf", "--model_args", margs, "--include_path", str(TASKS), "--tasks",
           ",".join(tasks), "--metadata", json.dumps(metadata), "--limit", "4", "--batch_size", "4",
           "--device", "cpu", "--output_path", str(tmp_path)]
    rc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    [stock_file] = tmp_path.rglob("results_*.json")
    stock = json.loads(stock_file.read_text())
    for task in tasks:
        row = {k: v for k, v in ours["results"][task].items()}
        assert stock["results"][task] == row, task
        assert set(nlg_metrics.METRICS) <= {k.split(",")[0] for k in row}


@pytest.mark.slow  # ~15 s: builds the wheel install of tests/test_packaging.py
@pytest.mark.skipif(not SHARED_E2E.is_dir(), reason=f"{SHARED_E2E} (the E2E dev/test JSONL) is absent")
def test_wheel_install_ships_the_e2e_tasks(installed):
    """A non-editable install finds hk_e2e* among the shipped tasks and builds the local one (e2e.py imports the
    installed package)."""
    python, env, work = installed
    code = ("from lm_eval.tasks import TaskManager, get_task_dict; from hiddenkey_ds.resources import resource_dir; "
            f"m = TaskManager(include_path=str(resource_dir('eval_tasks')), metadata={{'e2e_dir': {str(SHARED_E2E)!r}}}); "
            "print(sorted(n for n in m.all_tasks if n.startswith('hk_e2e'))); "
            "t = get_task_dict(['hk_e2e_local'], m)['hk_e2e_local']; print(len(t.test_docs()))")
    found = subprocess.run([str(python), "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, found.stderr[-3000:]
    assert "['hk_e2e', 'hk_e2e_gpt2', 'hk_e2e_local', 'hk_e2e_local_gpt2']" in found.stdout
    assert found.stdout.split()[-1] == "630"
