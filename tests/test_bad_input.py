"""Bad input across the commands, as a new user would make it: one clear message with a hint, exit status 2, no
traceback, printed once (once for two ranks too), before any work, and the directories involved untouched.

Most cases run `hiddenkey-ds ...` in this process (its entry point is what a user runs; the errors all come
before torch.distributed, DeepSpeed or the weights are touched); the multi-rank cases and launch.sh run as the
user would start them."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import yaml

from hiddenkey_ds import cli
from train_runs import REPO, free_port, tree

TINY = REPO / "recipes" / "tiny-lora.yaml"


@dataclass
class Case:
    id: str
    argv: list[str]                   # after `hiddenkey-ds`; "{w}" is the case's working directory
    message: str                      # must appear exactly once in stderr
    files: dict[str, str] = field(default_factory=dict)  # relative path -> content, written into {w} first
    hint: bool = True                 # the message carries a "(hint: ...)"


def train(*overrides: str, recipe: str | Path = TINY) -> list[str]:
    return ["train", str(recipe), "run.output_dir={w}/out", *overrides]


SWEEP = {"out_dir": "{w}/sweep-out", "recipe": str(TINY), "methods": {"lora": []}, "seeds": [0],
         "tasks": {"toy": []}}


def _sweep(**change) -> str:
    return yaml.safe_dump({**SWEEP, **change})



CASES = [
    # -- train: the recipe and its overrides
    Case("recipe-missing", ["train", "{w}/nope.yaml"], "recipe file '{w}/nope.yaml' does not exist"),
    Case("recipe-not-a-mapping", ["train", "{w}/list.yaml"], "must hold a mapping of sections",
         {"list.yaml": "- run\n- model\n"}, hint=False),
    Case("recipe-not-yaml", ["train", "{w}/bad.yaml"], "is not valid YAML", {"bad.yaml": "run: [unclosed\n"},
         hint=False),
    Case("override-unknown-key", train("train.learning_rate=1e-4"),
         "override train.learning_rate: unknown key (hint: did you mean train.lr?)"),
    Case("override-without-equals", train("train.lr"), "override 'train.lr': expected KEY=VALUE"),
    Case("override-wrong-type", train("train.max_steps=ten"), "train.max_steps: expected a whole number, got 'ten'",
         hint=False),
    Case("deepspeed-config-missing", train("run.deepspeed={w}/ds.json"), "run.deepspeed: no DeepSpeed config"),
    # -- train: the run directory
    Case("output-dir-is-a-file", ["train", str(TINY), "run.output_dir={w}/afile"],
         "run.output_dir: {w}/afile is a file, not a directory", {"afile": "x"}),
    Case("unfinished-run-without-resume", train(), "holds checkpoints of an unfinished run",
         {"out/checkpoints/step_3/COMPLETE": "{}"}),
    Case("resume-with-changed-recipe", train("run.resume=true", "train.lr=5e-3"),
         "train.lr: 0.001 in the run, 0.005 now",
         {"out/checkpoints/step_3/COMPLETE": "{}", "out/config.yaml": "<tiny-lora resolved>"}, hint=False),
    # -- train: the model
    Case("model-path-missing", train("model.name={w}/no-model"),
         "model.name: '{w}/no-model' looks like a local path but does not exist"),
    Case("model-dir-without-config", train("model.name={w}/model"), "without config.json",
         {"model/weights.bin": "x"}),
    Case("lora-target-missing", train("lora.target_modules=[q_proj,qkv_proj]"),
         "lora.target_modules: 'qkv_proj' matches no module of 'builtin:tiny-llama'"),
    Case("lora-on-lm-head-twice", train("lora.target_modules=[q_proj,lm_head]", "dropout.preset=hiddenkey",
                                        "dropout.consistency_grad=both"),
         "LoRA on lm_head is used more than once per forward"),
    # -- train: the data
    Case("data-path-missing", train("data.path={w}/no-data"), "data.path: '{w}/no-data' does not exist"),
    Case("data-row-without-label", train("data.path={w}/data"), "1 row(s) of the train split have no value in "
         "column 'label' (row 2", {"data/train.jsonl": '{"sentence": "good", "label": 1}\n{"sentence": "bad"}\n',
                                   "data/dev.jsonl": '{"sentence": "fine", "label": 1}\n'}),
    Case("data-column-missing", train("data.path={w}/data"), "the train split lacks column(s) ['sentence']",
         {"data/train.jsonl": '{"text": "good", "label": 1}\n', "data/dev.jsonl": '{"sentence": "ok", "label": 1}\n'}),
    Case("data-split-missing", train("data.path={w}/data"), "data.eval_split: split 'validation' not found",
         {"data/train.jsonl": '{"sentence": "good", "label": 1}\n'}),
    # -- train: evaluation at the end that cannot run
    Case("at-end-sft-without-tasks", train("eval.at_end=true", "data.format=sft", "data.task=null",
                                           "data.path={w}/sft.jsonl"),
         "eval.at_end: the run trains on free-form (sft) data", {"sft.jsonl": '{"prompt": "a", "response": "b"}\n'}),
    Case("at-end-single-file", train("eval.at_end=true", "data.path={w}/train.jsonl", "data.eval_split=null"),
         "eval.at_end: data.path='{w}/train.jsonl' is a single file",
         {"train.jsonl": '{"sentence": "good", "label": 1}\n'}),
    Case("at-end-qlora-zero3", train("eval.at_end=true", "model.quantization=4bit", "run.deepspeed=zero3"),
         "eval.at_end: this 4bit recipe partitions its quantized base"),
    # -- eval
    Case("eval-not-a-run", ["eval", "{w}/empty"], "is neither a run directory", {"empty/x.txt": "x"}, hint=False),
    Case("eval-unfinished-run", ["eval", "{w}/run"], "no final adapter",
         {"run/config.yaml": "<tiny-lora resolved>"}, hint=False),
    Case("eval-broken-run-recipe", ["eval", "{w}/run"], "is not a valid resolved recipe",
         {"run/config.yaml": "- a\n"}),
    # -- report
    Case("report-not-a-run", ["report", "{w}/empty", "--out", "{w}/report"], "is not a run directory",
         {"empty/x.txt": "x"}, hint=False),
    # -- sweep
    Case("sweep-file-missing", ["sweep", "{w}/nope.yaml"], "cannot read sweep file", hint=False),
    Case("sweep-unknown-key", ["sweep", "{w}/s.yaml"], "method: unknown key (hint: did you mean methods?)",
         {"s.yaml": _sweep(method={"x": []})}),
    Case("sweep-bad-override", ["sweep", "{w}/s.yaml"], "'train.bogus=1': train.bogus: unknown key (hint: ",
         {"s.yaml": _sweep(overrides=["train.bogus=1"])}),
    Case("sweep-recipe-missing", ["sweep", "{w}/s.yaml"], "recipe {w}/none.yaml does not exist",
         {"s.yaml": _sweep(recipe="{w}/none.yaml")}, hint=False),
    # -- plan
    Case("plan-unknown-key", ["plan", str(TINY), "lora.rank=4"], "override lora.rank: unknown key (hint: did you "
         "mean lora.r?)"),
    Case("plan-unknown-model", ["plan", str(TINY), "model.name=org/unknown"], "no shape for model 'org/unknown'"),
    Case("plan-no-nodes", ["plan", str(TINY), "--nodes", "0"], "--nodes must be >= 1", hint=False),
]


def _prepare(case: Case, work: Path) -> tuple[list[str], str]:
    for name, content in case.files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "<tiny-lora resolved>":
            from hiddenkey_ds.config import load_recipe

            content = load_recipe(TINY, [f"run.output_dir={work}/out"], check_output_dir=False).to_yaml()
        path.write_text(content.replace("{w}", str(work)))
    return [a.replace("{w}", str(work)) for a in case.argv], case.message.replace("{w}", str(work))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_message_exit_2_and_touches_nothing(case, tmp_path, capsys, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    argv, message = _prepare(case, work)
    monkeypatch.chdir(work)
    before = tree(work)
    with mock.patch.dict(os.environ):  # nothing a command sets may leak into the next case
        code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count(message) == 1, err
    assert "Traceback" not in out + err
    if case.hint:
        assert "(hint: " in err, err
    assert tree(work) == before  # no output directory, no log, no cache: nothing written


def test_matrix_covers_every_command():
    assert len(CASES) >= 20 and {c.argv[0] for c in CASES} >= {"train", "eval", "report", "sweep", "plan"}


# -- as a user starts them: two ranks, the demo, launch.sh ---------------------------------------------------------

def _deepspeed_two_ranks(work: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 --module hiddenkey_ds.train` on CPU ranks, as the README and the sweep start it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", "--module", "hiddenkey_ds.train", str(TINY), f"run.output_dir={work}/out", *overrides]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("override,message", [
    ("model.name={w}/no-model", "looks like a local path but does not exist"),
    ("lora.target_modules=[q_proj,qkv_proj]", "'qkv_proj' matches no module"),
], ids=["model-path", "lora-target"])
def test_two_ranks_print_the_error_once_without_traceback(tmp_path, override, message):
    work = tmp_path / "w"
    work.mkdir()
    before = tree(work)
    res = _deepspeed_two_ranks(work, override.replace("{w}", str(work)))
    output = res.stdout + res.stderr
    assert res.returncode == 2, output[-3000:]
    assert output.count(message) == 1, output[-3000:]
    assert "Traceback" not in output and "tokenizing" not in output  # before the data, and no rank-prefixed dumps
    assert tree(work) == before


def test_demo_bad_ranks_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--ranks", "two", "--out", str(tmp_path / "demo")])
    assert info.value.code == 2 and "invalid int value: 'two'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_launch_bad_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=two\n")
    before = tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HKDS_"))}
    res = subprocess.run([str(REPO / "launch.sh"), "--hostfile", str(hostfile), str(TINY),
                          f"run.output_dir={tmp_path}/out"], env={**env, "HKDS_PYTHON": sys.executable},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("expected 'hostname slots=N'") == 1, res.stderr
    assert "Traceback" not in res.stderr and tree(tmp_path) == before
