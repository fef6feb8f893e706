"""What a causal LM's own forward does to the logits after its output head, so that the objective's chunked head
(which calls the head module itself) computes the logits the model computes.

Most causal LMs return `lm_head(hidden)` as is. Some transform it afterwards (transformers 5.23):

    final_logit_softcapping   tanh(x / c) * c    Gemma-2/3/3n/4, VaultGemma, NanoChat, Beam
    logits_soft_cap           tanh(x / c) * c    RecurrentGemma
    output_logit_soft_cap     tanh(x / c) * c    xLSTM
    logit_scale               x * s              Cohere, Cohere2, Cohere2-MoE, CohereCompass
    logits_scaling            x / s              Granite, Granite-SWA, GraniteMoE (-SWA, -Shared, -Hybrid)
    logits_scaling            x * s              HyperCLOVAX
    lm_head_multiplier        x * s              Falcon-H1

`logit_transform(model)` returns that transform (identity for the plain ones). Any other model whose forward does
more than `logits = self.<output embeddings>(hidden_states)` (read from its source: a scaled hidden state before the
head, a prediction head around the output embeddings, a sliced vocabulary, ...) is refused with
UnsupportedModelError naming the model: training it through the chunked head would silently optimise other logits
than the ones the model is evaluated with. `head_problem(model)` says the same without raising (start-up checks
call it on a meta-device model: it reads only classes, configs and attributes).
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Callable

import torch


class UnsupportedModelError(ValueError):
    """A model whose layout or output head the method cannot handle; the message names the model class."""


Transform = Callable[[torch.Tensor], torch.Tensor]


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _softcap(cap: float | None) -> Transform:
    if cap is None:
        return _identity
    cap = float(cap)
    return lambda logits: torch.tanh(logits / cap) * cap


def _scale(factor: float) -> Transform:
    factor = float(factor)
    return lambda logits: logits * factor


def _divide(divisor: float) -> Transform:
    divisor = float(divisor)
    return lambda logits: logits / divisor


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# class name -> (the config/attribute name its forward's transform reads, the transform), from each modeling file of
# transformers 5.23; tests/test_objective.py checks every family against the model's own forward. Used only when
# the forward's source is not plain and names that attribute (Gemma3ForConditionalGeneration, say, does not cap).
_FINAL_SOFTCAP = ("final_logit_softcapping",
                  lambda m: _softcap(getattr(_text_config(m), "final_logit_softcapping", None)))
_COHERE = ("logit_scale", lambda m: _scale(m.logit_scale))
_GRANITE = ("logits_scaling", lambda m: _divide(m.config.logits_scaling))
_TRANSFORMS: dict[str, tuple[str, Callable[[torch.nn.Module], Transform]]] = {
    **{name: _FINAL_SOFTCAP for name in (
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma4ForCausalLM",
        "Gemma4UnifiedForCausalLM", "Gemma3nForConditionalGeneration", "Gemma4ForConditionalGeneration",
        "Gemma4UnifiedForConditionalGeneration", "VaultGemmaForCausalLM", "NanoChatForCausalLM", "BeamForCausalLM")},
    "RecurrentGemmaForCausalLM": ("logits_soft_cap", lambda m: _softcap(m.config.logits_soft_cap)),
    "xLSTMForCausalLM": ("output_logit_soft_cap", lambda m: _softcap(m.config.output_logit_soft_cap)),
    **{name: _COHERE for name in (
        "CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM")},
    **{name: _GRANITE for name in (
        "GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
        "GraniteMoeSharedForCausalLM", "GraniteMoeHybridForCausalLM")},
    "HyperCLOVAXForCausalLM": ("logits_scaling", lambda m: _scale(m.config.logits_scaling)),
    "FalconH1ForCausalLM": ("lm_head_multiplier", lambda m: _scale(m.model.lm_head_multiplier)),
}


def _known(model: torch.nn.Module) -> tuple[str, Callable[[torch.nn.Module], Transform]] | None:
    for klass in type(model).__mro__:
        if klass.__name__ in _TRANSFORMS:
            return _TRANSFORMS[klass.__name__]
    return None


def _source(klass: type) -> str | None:
    try:
        return textwrap.dedent(inspect.getsource(klass.forward))
    except (OSError, TypeError):
        return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_attr(model: torch.nn.Module) -> str | None:
    head = model.get_output_embeddings()
    for name, child in model.named_children():
        if child is head and head is not None:
            return name
    return None


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attr
            and isinstance(node.value, ast.Name) and node.value.id == "self")


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    return []


def _names(target: ast.AST) -> set[str]:
    """Names a target assigns or writes into (x, x[...], x.attr, tuples of them)."""
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Subscript, ast.Attribute)):
        return _names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_names(t) for t in target.elts)) if target.elts else set()
    return set()


def _plain_hidden_source(value: ast.AST) -> bool:
    """`outputs.last_hidden_state`, `outputs[0]`, `slice_logits_to_keep(hidden_states, ...)`: no arithmetic."""
    if isinstance(value, (ast.Name, ast.Attribute)):
        return True
    if isinstance(value, ast.Subscript):
        return _plain_hidden_source(value.value)
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "slice_logits_to_keep":
        return True
    if isinstance(value, ast.IfExp):
        return _plain_hidden_source(value.body) and _plain_hidden_source(value.orelse)
    return False


@functools.lru_cache(maxsize=None)
def _forward_problem(klass: type, head: str) -> str | None:
    """Why `klass.forward` is not `logits = self.<head>(hidden_states)` returned unchanged, or None."""
    source = _source(klass)
    try:
        fn = ast.parse(source).body[0]
    except (TypeError, SyntaxError, IndexError):
        return "its forward's source cannot be read, so what it does after the output head is unknown"
    assigns = [(t, node.value) for node in ast.walk(fn) for t in _targets(node)]
    calls = [(t, v) for t, v in assigns
             if v is not None and any(isinstance(c, ast.Call) and _is_self_attr(c.func, head) for c in ast.walk(v))]
    if len(calls) != 1 or not isinstance(calls[0][0], ast.Name):
        return f"its forward does not compute the logits as one `self.{head}(...)` call"
    logits_name, value = calls[0][0].id, calls[0][1]
    while (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and not _is_self_attr(value.func, head)
           and value.func.attr in ("float", "contiguous") and not value.args):
        value = value.func.value  # .float() / .contiguous(): the loss computes in fp32 anyway
    if not (isinstance(value, ast.Call) and _is_self_attr(value.func, head) and len(value.args) == 1):
        return f"its forward transforms the output of `self.{head}` ({ast.unparse(calls[0][1])})"
    rewrites = [ast.unparse(t) for t, v in assigns if logits_name in _names(t) and v is not calls[0][1]]
    if rewrites:
        return f"its forward changes the logits after `self.{head}` (assigns {', '.join(rewrites)})"
    arg = value.args[0]
    while isinstance(arg, ast.Subscript) or (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                                             and arg.func.attr == "to"):
        arg = arg.value if isinstance(arg, ast.Subscript) else arg.func.value
    if not isinstance(arg, ast.Name):
        return f"its forward feeds `self.{head}` a computed input ({ast.unparse(value.args[0])})"
    for t, v in assigns:
        if arg.id in _names(t) and (v is None or not _plain_hidden_source(v)):
            return f"its forward transforms the hidden states before `self.{head}` ({ast.unparse(v)})"
    for node in ast.walk(fn):  # what it returns: `logits=logits`, not `logits=f(logits)`
        if isinstance(node, ast.keyword) and node.arg == "logits" and not (
                isinstance(node.value, ast.Name) and node.value.id == logits_name):
            return f"its forward returns `logits={ast.unparse(node.value)}`"
    return None


def head_problem(model: torch.nn.Module) -> str | None:
    """One line saying why the chunked head cannot reproduce `model`'s logits (a transformers model or a PeftModel
    wrapping one), or None. Works on a meta-device model."""
    model = _unwrap(model)
    name = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    head = _head_attr(model)
    if head is None:
        return f"{name} has no output-embedding module among its direct children, so its logits cannot be computed " \
               "in chunks"
    reason = _forward_problem(type(model), head)
    known = _known(model)
    if reason is None or (known is not None and known[0] in (_source(type(model)) or "")):
        return None
    return f"{name}: {reason}, and hiddenkey-ds knows no equivalent for it"


def logit_transform(model: torch.nn.Module) -> Transform:
    """What `model`'s forward applies to the output of its head (identity for most models). Raises
    UnsupportedModelError for a model whose logits the chunked head cannot reproduce."""
    model = _unwrap(model)
    problem = head_problem(model)
    if problem is not None:
        raise UnsupportedModelError(problem)
    if _forward_problem(type(model), _head_attr(model)) is None:
        return _identity
    return _known(model)[1](model)
