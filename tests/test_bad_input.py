"""Bad input across the commands, as a new user would make it: one clear message with a hint, exit status 2, no
traceback, printed once (once for two ranks too), before any work, and the directories involved untouched.

Most cases run `hiddenkey-ds ...` in this process (its entry point is what a user runs; the errors all come
before torch.distributed, DeepSpeed or the weights are touched); the multi-rank cases and launch.sh run as the
user would start them. CASES is a matrix of (command, input, kind of bad input: KINDS); a test checks that every
command meets every kind of input it takes."""
from __future__ import annotations

import contextlib
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
    files: dict[str, str | bytes] = field(default_factory=dict)  # relative path -> content, written into {w} first
    hint: bool = True                 # the message carries a "(hint: ...)"
    kind: str = "value"               # which kind of bad input (KINDS)
    patch: dict[str, object] = field(default_factory=dict)  # mock.patch target -> replacement (a model lacking X)


# The kinds of bad input every command is tried with (test_matrix_covers_every_command_and_kind):
#   encoding      a text input that is not UTF-8 (latin-1 bytes, a binary file under a text name)
#   truncation    a file cut off mid-record / mid-header
#   corruption    a file whose bytes are not what its name says (damaged weights, not-parquet, garbage)
#   range         a number outside what the input can be (<= 0, NaN, a layer past the last)
#   file-type     a directory where a file goes, a file where a directory goes, the wrong format
#   model         a model (or machine) without what the recipe's method needs
#   value         anything else: unknown keys, missing paths, contradictions
KINDS = ("encoding", "truncation", "corruption", "range", "file-type", "model", "value")
LATIN1 = "caf\xe9".encode("latin-1")    # not UTF-8: 0xe9 starts a 3-byte sequence that never completes
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(128, 256))  # a binary file: 0x89 starts no character


def _adapter_bytes() -> bytes:
    """A small, valid adapter_model.safetensors (the damaged cases cut or overwrite it)."""
    import torch
    from safetensors.torch import save

    return save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)})


ADAPTER = _adapter_bytes()
ADAPTER_CONFIG = '{"base_model_name_or_path": "builtin:tiny-llama", "peft_type": "LORA", "r": 8}'


def _run_dir(**replace: str | bytes) -> dict[str, str | bytes]:
    """A finished-looking run directory `run/` (resolved tiny-lora recipe, final adapter) with files replaced."""
    files = {"run/config.yaml": "<tiny-lora resolved>", "run/summary.json": '{"steps": 30}',
             "run/adapter/adapter_config.json": ADAPTER_CONFIG, "run/adapter/adapter_model.safetensors": ADAPTER}
    return {**files, **{f"run/{k}": v for k, v in replace.items()}}


def _data_dir(train: str | bytes = '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n',
              name: str = "train.jsonl") -> dict[str, str | bytes]:
    return {f"data/{name}": train, "data/dev.jsonl": '{"sentence": "fine", "label": 1}\n'}


# a decoder whose blocks are GPT-2's (`attn` + `mlp`), not the LLaMA layout (`self_attn` + `mlp`)
GPT2_CONFIG = ('{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 100, "n_positions": 64, '
               '"bos_token_id": 0, "eos_token_id": 0}')

# a decoder whose forward scales the hidden states before its head (hidden / logits_scaling): the chunked loss
# knows no equivalent (hiddenkey_ds.method.heads), so training on it would use other logits than lm-eval scores
MINICPM3_CONFIG = ('{"model_type": "minicpm3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
                   '"num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 100}')


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
    Case("plan-no-nodes", ["plan", str(TINY), "--nodes", "0"], "--nodes must be >= 1", kind="range"),
]

# -- the matrix by input kind ---------------------------------------------------------------------------------
CASES += [
    # train: the recipe file, the DeepSpeed JSON, the data files
    Case("train-recipe-latin1", ["train", "{w}/r.yaml"], "recipe file '{w}/r.yaml' is not UTF-8 text",
         {"r.yaml": b"run:\n  label: " + LATIN1 + b"\n"}, kind="encoding"),
    Case("train-recipe-binary", ["train", "{w}/r.yaml"], "recipe file '{w}/r.yaml' is not UTF-8 text",
         {"r.yaml": BINARY}, kind="file-type"),
    Case("train-recipe-directory", ["train", "{w}/r"], "recipe file '{w}/r' is a directory", {"r/x": "x"},
         kind="file-type"),
    Case("train-recipe-truncated", ["train", "{w}/r.yaml"], "is not valid YAML", {"r.yaml": "run: {output_dir: "},
         kind="truncation"),
    Case("train-deepspeed-latin1", train("run.deepspeed={w}/ds.json"), "run.deepspeed: {w}/ds.json is not valid "
         "JSON", {"ds.json": b'{"zero_optimization": {"stage": 2}, "x": "' + LATIN1 + b'"}'}, kind="encoding"),
    Case("train-deepspeed-truncated", train("run.deepspeed={w}/ds.json"), "run.deepspeed: {w}/ds.json is not "
         "valid JSON", {"ds.json": '{"zero_optimization": {"stage": '}, kind="truncation"),
    Case("train-data-latin1", train("data.path={w}/data"), "data.path: {w}/data/train.jsonl is not UTF-8 text: "
         "byte 0xe9 at offset 50 (line 2)", _data_dir(b'{"sentence": "good", "label": 1}\n{"sentence": "'
                                                       + LATIN1 + b'", "label": 0}\n'), kind="encoding"),
    Case("train-data-cut-in-a-character", train("data.path={w}/data"), "ends inside a multi-byte character",
         _data_dir('{"sentence": "good", "label": 1}\n{"sentence": "\u00e9'.encode()[:-1]), kind="truncation"),
    Case("train-data-truncated-record", train("data.path={w}/data"), "data.path: cannot read {w}/data/train.jsonl "
         "as json", _data_dir('{"sentence": "good", "label": 1}\n{"sentence": "ba'), kind="truncation"),
    Case("train-data-not-parquet", train("data.path={w}/data"), "data.path: {w}/data/train.parquet is not a "
         "parquet file", _data_dir("sentence,label\ngood,1\n", name="train.parquet"), kind="corruption"),
    Case("train-data-parquet-cut", train("data.path={w}/data"), "data.path: {w}/data/train.parquet is cut off",
         _data_dir(b"PAR1" + bytes(64), name="train.parquet"), kind="truncation"),
    Case("train-eval-path-latin1", train("data.path={w}/data", "data.eval_path={w}/ev.csv"),
         "data.eval_path: {w}/ev.csv is not UTF-8 text", {**_data_dir(), "ev.csv": b"sentence,label\n" + LATIN1
                                                             + b",1\n"}, kind="encoding"),
    # train: what the model (and machine) must offer the method, found on the meta-device model
    Case("train-dropout-layers-range", train("dropout.preset=hiddenkey", "dropout.layers=5-7"),
         "dropout.layers: 5-7 reaches layer 7, but LlamaForCausalLM has 2 decoder layers (indices 0-1)",
         kind="range"),
    Case("train-dropout-layers-list", train("dropout.preset=hiddencut", "dropout.layers=[0,3]"),
         "dropout.layers: [0, 3] reaches layer 3, but LlamaForCausalLM has 2 decoder layers", kind="range"),
    Case("train-dropout-layers-without-dropout", train("dropout.layers=2-2"),
         "dropout.layers: 2-2 reaches layer 2, but LlamaForCausalLM has 2 decoder layers", kind="range"),
    Case("train-flex-without-cuda", train("dropout.preset=dropkey", "dropout.key.pattern=column",
                                          "dropout.key_kernel=flex"),
         "dropout.key_kernel: flex trains only on CUDA", kind="model",
         patch={"torch.cuda.is_available": lambda: False}),  # the same answer on a GPU machine
    Case("train-layout-not-llama", train("model.name={w}/gpt2", "lora.target_modules=[c_attn]",
                                         "dropout.preset=hiddenkey"),
         "dropout: GPT2LMHeadModel has no decoder layers with `self_attn` and `mlp` submodules",
         {"gpt2/config.json": GPT2_CONFIG}, kind="model"),
    Case("train-unknown-post-head-transform", train("model.name={w}/minicpm3", "lora.target_modules=[o_proj]"),
         "model.name: MiniCPM3ForCausalLM (model_type 'minicpm3'): its forward transforms the hidden states before",
         {"minicpm3/config.json": MINICPM3_CONFIG}, kind="model"),
    Case("train-no-attention-interface", train("dropout.preset=dropkey"), "dropout: LlamaForCausalLM does not "
         "dispatch attention through transformers' AttentionInterface", kind="model",
         patch={"transformers.LlamaForCausalLM._can_set_attn_implementation": classmethod(lambda cls: False)}),
    Case("train-no-decoder-stack", train("dropout.preset=hiddenkey", "dropout.keep_first_tokens=1"),
         "dropout.keep_first_tokens: 1 needs the model's decoder stack", kind="model",
         patch={"transformers.LlamaForCausalLM.get_decoder": lambda self: None}),
    Case("train-no-lm-head", train(), "model.name: 'builtin:tiny-llama' (LlamaForCausalLM) has no LM head "
         "(get_output_embeddings())", kind="model",
         patch={"transformers.LlamaForCausalLM.get_output_embeddings": lambda self: None}),
    # eval: the run directory's files, the adapter's, the options
    Case("eval-adapter-truncated", ["eval", "{w}/run"], "{w}/run/adapter/adapter_model.safetensors is truncated "
         "or corrupt", _run_dir(**{"adapter/adapter_model.safetensors": ADAPTER[:len(ADAPTER) // 2]}),
         kind="truncation"),
    Case("eval-adapter-header-cut", ["eval", "{w}/run"], "adapter_model.safetensors is truncated or corrupt",
         _run_dir(**{"adapter/adapter_model.safetensors": ADAPTER[:5]}), kind="truncation"),
    Case("eval-adapter-garbage", ["eval", "{w}/run"], "adapter_model.safetensors is truncated or corrupt",
         _run_dir(**{"adapter/adapter_model.safetensors": b"\xff" * 64}), kind="corruption"),
    Case("eval-adapter-weights-missing", ["eval", "{w}/run/adapter", "--out", "{w}/res"], "no adapter weights "
         "(adapter_model.safetensors or adapter_model.bin)", {"run/adapter/adapter_config.json": ADAPTER_CONFIG},
         kind="file-type"),
    Case("eval-adapter-config-truncated", ["eval", "{w}/run"], "{w}/run/adapter/adapter_config.json cannot be "
         "read as JSON", _run_dir(**{"adapter/adapter_config.json": ADAPTER_CONFIG[:20]}), kind="truncation"),
    Case("eval-adapter-config-latin1", ["eval", "{w}/run"], "adapter_config.json cannot be read as JSON "
         "(UnicodeDecodeError", _run_dir(**{"adapter/adapter_config.json": b'{"r": "' + LATIN1 + b'"}'}),
         kind="encoding"),
    Case("eval-run-recipe-latin1", ["eval", "{w}/run"], "{w}/run/config.yaml is not UTF-8 text",
         _run_dir(**{"config.yaml": b"run:\n  label: " + LATIN1 + b"\n"}), kind="encoding"),
    Case("eval-summary-latin1", ["eval", "{w}/run"], "{w}/run/summary.json is not JSON",
         _run_dir(**{"summary.json": LATIN1}), kind="encoding"),
    Case("eval-batch-size-zero", ["eval", "{w}/run", "--batch-size", "0"], "--batch-size 0: must be >= 1",
         _run_dir(), kind="range"),
    Case("eval-limit-nan", ["eval", "{w}/run", "--limit", "nan"], "--limit nan: give a number of examples",
         _run_dir(), kind="range"),
    Case("eval-limit-negative", ["eval", "{w}/run", "--limit", "-3"], "--limit -3: give a number of examples",
         _run_dir(), kind="range"),
    Case("eval-out-is-a-file", ["eval", "{w}/run", "--out", "{w}/afile"], "--out {w}/afile: is the file {w}/afile",
         {**_run_dir(), "afile": "x"}, kind="file-type"),
    Case("eval-data-dir-missing", ["eval", "{w}/run", "--data-dir", "sst2={w}/nodir"], "--data-dir "
         "sst2={w}/nodir: '{w}/nodir' is not a directory", _run_dir(), kind="file-type"),
    Case("eval-dtype-unknown", ["eval", "{w}/run", "--dtype", "float13"], "--dtype 'float13' is not a torch dtype",
         _run_dir()),
    Case("eval-device-unknown", ["eval", "{w}/run", "--device", "gpu0"], "--device 'gpu0' is not a device",
         _run_dir()),
    # plan: numbers and the --config file
    Case("plan-gpu-mem-negative", ["plan", str(TINY), "--gpu-mem", "-8"], "--gpu-mem -8: GiB of memory per GPU "
         "must be a positive number", kind="range"),
    Case("plan-gpu-mem-zero", ["plan", str(TINY), "--gpu-mem", "0"], "--gpu-mem 0: GiB of memory per GPU",
         kind="range"),
    Case("plan-gpu-mem-inf", ["plan", str(TINY), "--gpu-mem", "inf"], "--gpu-mem inf: GiB", kind="range"),
    Case("plan-seq-len-zero", ["plan", str(TINY), "--seq-len", "0"], "--seq-len 0: a sequence needs at least 2 "
         "tokens", kind="range"),
    Case("plan-supervised-too-many", ["plan", str(TINY), "--seq-len", "16", "--supervised-tokens", "16"],
         "--supervised-tokens 16: at most --seq-len - 1 = 15", kind="range"),
    Case("plan-dropout-layers-range", ["plan", str(TINY), "dropout.preset=hiddenkey", "dropout.layers=5-7"],
         "dropout.layers=5-7: the model has 2 decoder layers", kind="range"),
    Case("plan-recipe-latin1", ["plan", "{w}/r.yaml"], "recipe file '{w}/r.yaml' is not UTF-8 text",
         {"r.yaml": b"run:\n  label: " + LATIN1 + b"\n"}, kind="encoding"),
    Case("plan-config-latin1", ["plan", str(TINY), "--config", "{w}/config.json"], "--config {w}/config.json: is "
         "not a JSON file (UnicodeDecodeError", {"config.json": b'{"name": "' + LATIN1 + b'"}'}, kind="encoding"),
    Case("plan-config-truncated", ["plan", str(TINY), "--config", "{w}/config.json"], "--config {w}/config.json: "
         "is not a JSON file (JSONDecodeError", {"config.json": '{"hidden_size": 64, "num_hidden'}, kind="truncation"),
    Case("plan-config-directory", ["plan", str(TINY), "--config", "{w}/model"], "--config {w}/model: is a directory",
         {"model/config.json": "{}"}, kind="file-type"),
    Case("plan-config-missing", ["plan", str(TINY), "--config", "{w}/none.json"], "--config {w}/none.json: no such "
         "file"),
    # sweep: the sweep file and the recipes it names
    Case("sweep-file-latin1", ["sweep", "{w}/s.yaml"], "sweep file {w}/s.yaml is not UTF-8 text",
         {"s.yaml": _sweep().encode() + b"# " + LATIN1 + b"\n"}, kind="encoding"),
    Case("sweep-file-truncated", ["sweep", "{w}/s.yaml"], "{w}/s.yaml is not valid YAML",
         {"s.yaml": "methods: {lora: [\n"}, kind="truncation"),
    Case("sweep-file-directory", ["sweep", "{w}/s"], "cannot read sweep file {w}/s: Is a directory", {"s/x": "x"},
         kind="file-type"),
    Case("sweep-recipe-latin1", ["sweep", "{w}/s.yaml"], "recipe file '{w}/r.yaml' is not UTF-8 text",
         {"s.yaml": _sweep(recipe="{w}/r.yaml"), "r.yaml": b"# " + LATIN1 + b"\n"}, kind="encoding"),
    Case("sweep-ranks-zero", ["sweep", "{w}/s.yaml"], "ranks: Input should be greater than or equal to 1",
         {"s.yaml": _sweep(ranks=0)}, hint=False, kind="range"),
    # report: the run directory's files and --out
    Case("report-metrics-latin1", ["report", "{w}/run", "--out", "{w}/report"], "{w}/run/metrics.jsonl is not "
         "UTF-8 text", _run_dir(**{"metrics.jsonl": b'{"step": 1}\n' + LATIN1 + b"\n"}), kind="encoding"),
    Case("report-metrics-truncated", ["report", "{w}/run", "--out", "{w}/report"], "{w}/run/metrics.jsonl line 2 "
         "is not JSON", _run_dir(**{"metrics.jsonl": '{"step": 1}\n{"step": '}), kind="truncation"),
    Case("report-results-truncated", ["report", "{w}/run", "--out", "{w}/report"], "{w}/run/eval/results.json is "
         "not JSON", _run_dir(**{"eval/results.json": '{"results": '}), kind="truncation"),
    Case("report-results-binary", ["report", "{w}/run", "--out", "{w}/report"], "{w}/run/eval/results.json is not "
         "UTF-8 text", _run_dir(**{"eval/results.json": BINARY}), kind="corruption"),
    Case("report-out-is-a-file", ["report", "{w}/run", "--out", "{w}/afile"], "--out {w}/afile: is the file "
         "{w}/afile, not a directory", {**_run_dir(), "afile": "x"}, kind="file-type"),
    Case("report-sweep-latin1", ["report", "--sweep", "{w}/s.yaml"], "sweep file {w}/s.yaml is not UTF-8 text",
         {"s.yaml": b"# " + LATIN1 + b"\n"}, kind="encoding"),
    # demo: its options (--dry-run: a case that got past its checks would only print)
    Case("demo-ranks-zero", ["demo", "--ranks", "0", "--out", "{w}/demo", "--dry-run"], "--ranks 0: each run "
         "needs at least one rank", kind="range"),
    Case("demo-seeds-empty", ["demo", "--seeds", ",", "--out", "{w}/demo", "--dry-run"], "--seeds ',': give one "
         "or more distinct integers", kind="range"),
    Case("demo-limit-zero", ["demo", "--limit", "0", "--out", "{w}/demo", "--dry-run"], "--limit 0: give a number "
         "of examples per task", kind="range"),
    Case("demo-recipe-latin1", ["demo", "--lora-recipe", "{w}/r.yaml", "--out", "{w}/demo", "--dry-run"],
         "recipe file '{w}/r.yaml' is not UTF-8 text", {"r.yaml": b"# " + LATIN1 + b"\n"}, kind="encoding"),
    Case("demo-out-is-a-file", ["demo", "--out", "{w}/afile", "--dry-run"], "--out {w}/afile: is the file {w}/afile",
         {"afile": "x"}, kind="file-type"),
]


def _prepare(case: Case, work: Path) -> tuple[list[str], str]:
    for name, content in case.files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "<tiny-lora resolved>":
            from hiddenkey_ds.config import load_recipe

            content = load_recipe(TINY, [f"run.output_dir={work}/out"], check_output_dir=False).to_yaml()
        if isinstance(content, bytes):
            path.write_bytes(content.replace(b"{w}", str(work).encode()))
        else:
            path.write_text(content.replace("{w}", str(work)))
    return [a.replace("{w}", str(work)) for a in case.argv], case.message.replace("{w}", str(work))


def _log_to_current_stderr() -> None:
    """Library loggers (datasets, transformers) keep the stderr of the test that first used them: a capture pytest
    has closed since, where a warning becomes "--- Logging error ---" and a traceback of the logging module."""
    import logging

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_message_exit_2_and_touches_nothing(case, tmp_path, capsys, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    argv, message = _prepare(case, work)
    monkeypatch.chdir(work)
    _log_to_current_stderr()
    before = tree(work)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ))  # nothing a command sets may leak into the next case
        for target, new in case.patch.items():
            stack.enter_context(mock.patch(target, new))
        code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count(message) == 1, err
    assert "Traceback" not in out + err
    if case.hint:
        assert "(hint: " in err, err
    assert tree(work) == before  # no output directory, no log, no cache: nothing written


def test_matrix_covers_every_command_and_kind():
    """Every subcommand is tried with bad input, and each with the kinds of input it takes: every command reads a
    text file (encoding), the file readers meet cut-off files (truncation), the numeric options meet bad numbers."""
    assert len({c.id for c in CASES}) == len(CASES) and {c.kind for c in CASES} <= set(KINDS)
    covered = {(c.argv[0], c.kind) for c in CASES}
    assert {c.argv[0] for c in CASES} == set(cli.SUBCOMMANDS)
    for command in cli.SUBCOMMANDS:
        assert (command, "encoding") in covered and (command, "file-type") in covered, command
    for command in ("train", "eval", "plan", "sweep", "report"):
        assert (command, "truncation") in covered, command
    for command in ("train", "eval", "plan", "demo"):
        assert (command, "range") in covered, command
    assert {k for _, k in covered} == set(KINDS)


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
    pytest.param("dropout.layers=5-7", "dropout.layers: 5-7 reaches layer 7", marks=pytest.mark.slow),
], ids=["model-path", "lora-target", "dropout-layers"])
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


def test_recipe_check_bad_world_size_is_a_usage_error(capsys):
    from hiddenkey_ds.config.__main__ import main as check_recipe

    with pytest.raises(SystemExit) as info:
        check_recipe([str(TINY), "--world-size", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("--world-size 0: a run has at least one rank (hint: ") == 1, err


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
