"""The training entry point around the loop: the evaluation after training runs as its own single-process
command, and user errors end in one message."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hiddenkey_ds.distributed import DISTRIBUTED_ENV, deepspeed_safe_arch_list, single_process_env
from hiddenkey_ds.evaluation.command import eval_command


def test_evaluation_after_training_gets_a_single_process_environment():
    launcher = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n1",
                "MASTER_PORT": "29500", "GROUP_RANK": "0", "ROLE_RANK": "0", "TORCHELASTIC_RUN_ID": "x",
                "OMPI_COMM_WORLD_SIZE": "4", "CROSS_RANK": "0", "LOCAL_SIZE": "4"}
    kept = {"PATH": "/bin", "HF_HOME": "/h", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "OMP_NUM_THREADS": "8",
            "HIDDENKEY_DS_CACHE": "/c", "NCCL_DEBUG": "INFO"}
    assert single_process_env({**launcher, **kept}) == kept
    assert {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} <= DISTRIBUTED_ENV


@pytest.mark.parametrize("before,after", [
    ("9.0a", "9.0"),                      # what the H200 image sets: DeepSpeed 0.19.8 died on int('0a')
    ("8.0 8.6 9.0a+PTX", "8.0;8.6;9.0+PTX"),
    ("9.0;9.0a;10.0f;12.0a", "9.0;10.0;12.0"),
])
def test_arch_variants_are_rewritten_for_deepspeeds_op_builder(before, after):
    env = {"TORCH_CUDA_ARCH_LIST": before}
    note = deepspeed_safe_arch_list(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == after and before in note and "DeepSpeed" in note
    # what DeepSpeed's builder does with the list: every minor part must parse as an int
    assert all(int(cc.split(".")[1].split("+")[0]) >= 0 for cc in after.split(";"))


@pytest.mark.parametrize("value", ["8.0;8.6;9.0+PTX", "7.5 8.0", ""])
def test_parseable_arch_lists_are_left_alone(value):
    env = {"TORCH_CUDA_ARCH_LIST": value} if value else {}
    assert deepspeed_safe_arch_list(env) is None and env.get("TORCH_CUDA_ARCH_LIST", "") == value


def test_evaluation_after_training_is_the_eval_command_with_the_recipes_settings(tmp_path):
    ev = SimpleNamespace(tasks=["hk_rte", "hk_sst2"], limit=100, batch_size=16)
    cmd = eval_command(tmp_path, tasks=ev.tasks, limit=ev.limit, batch_size=ev.batch_size)
    assert cmd[1:] == ["-m", "hiddenkey_ds.cli", "eval", str(tmp_path), "--tasks", "hk_rte,hk_sst2", "--limit", "100",
                       "--batch-size", "16"]
    assert eval_command(tmp_path, tasks=[], limit=None, batch_size=8)[4:] == [str(tmp_path), "--batch-size", "8"]


def _imports(module) -> set[str]:
    import ast
    import inspect

    return {alias.name if isinstance(node, ast.Import) else node.module
            for node in ast.walk(ast.parse(inspect.getsource(module)))
            if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in getattr(node, "names", [])}


def test_the_loop_ends_at_the_adapter_and_evaluation_is_a_separate_process():
    """The loop imports nothing from evaluation; the entry point starts the evaluation as a command, never
    lm-eval in-process."""
    import hiddenkey_ds.train as entry
    import hiddenkey_ds.training.loop as loop

    assert not any(name and (name.startswith("lm_eval") or name.startswith("hiddenkey_ds.evaluation"))
                   for name in _imports(loop))
    entry_imports = _imports(entry)
    assert "hiddenkey_ds.evaluation.command" in entry_imports
    assert not any(name and (name.startswith("lm_eval") or name == "hiddenkey_ds.evaluation.harness")
                   for name in entry_imports)
