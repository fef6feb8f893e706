"""Apply a DropoutConfig to an already-loaded transformers model, and undo it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from hiddenkey_ds.method import attention
from hiddenkey_ds.method.config import DropoutConfig
from hiddenkey_ds.method.heads import UnsupportedModelError
from hiddenkey_ds.method.hidden import make_mlp_hook
from hiddenkey_ds.method.masks import SinkTokens

_HANDLE_ATTR = "_hiddenkey_handle"


def unwrap_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PeftModel (LoRA layers stay injected in it) or the model itself."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel or a PeftModel wrapping one, got {type(model).__name__}")
    return model


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """Every module with a `self_attn` and an `mlp` child: the decoder layers of LLaMA-style models."""
    layers = [m for m in model.modules()
              if isinstance(getattr(m, "self_attn", None), torch.nn.Module)
              and isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers with `self_attn` and `mlp` submodules{_layout_note(model)}; "
            "the dropout methods support decoder-only models built on transformers' attention interface (LLaMA, "
            "Mistral, Qwen2, ...); plain LoRA (dropout preset none: every rate 0, no consistency) trains any layout"
        )
    return layers


def layout_problems(model: torch.nn.Module, config: DropoutConfig) -> list[str]:
    """What apply_dropout would refuse on `model` (a PreTrainedModel or a PeftModel), as recipe problems
    (`dropout.KEY: ... (hint: ...)`), found without running it: the start-up checks call this on the model built
    on the meta device, so that a run stops before its weights and data load. The layout is required only when
    `config` drops something; dropout.layers must name existing layers whenever the model has them."""
    base = unwrap_model(model)
    name = type(base).__name__
    on = config.describe().split(": ", 1)[-1]
    try:
        layers = decoder_layers(base)
    except ValueError:
        layers = []
    if not layers:
        if not config.active:
            return []
        return [f"dropout: {name} has no decoder layers with `self_attn` and `mlp` submodules (the LLaMA layout), "
                f"which the dropout of this recipe ({on}) attaches to (hint: use a LLaMA-family decoder such as "
                "LLaMA, Mistral or Qwen2, or dropout.preset=none for plain LoRA)"]
    problems, n = [], len(layers)
    spec = config.layers
    if not isinstance(spec, str) or spec not in ("all", "latter_half"):
        last = max(spec) if isinstance(spec, list) else int(spec.split("-")[1])
        if last >= n:
            shown = spec if isinstance(spec, str) else "[" + ", ".join(map(str, spec)) + "]"
            problems.append(
                f"dropout.layers: {shown} reaches layer {last}, but {name} has {n} decoder layer{'s' * (n != 1)} "
                f"(indices 0-{n - 1}) (hint: dropout.layers=latter_half, all, or a range inside 0-{n - 1})")
    if not config.active:
        return problems
    if config.touches_attention and not base._can_set_attn_implementation():
        problems.append(
            f"dropout: {name} does not dispatch attention through transformers' AttentionInterface, so key/attention "
            "dropout cannot be attached (hint: set dropout.key.rate=0 and dropout.attention.rate=0 and keep only "
            "hidden dropout with this model, or use a LLaMA-family decoder)")
    if config.keep_first_tokens:
        try:
            decoder = base.get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if not isinstance(decoder, torch.nn.Module):
            problems.append(
                f"dropout.keep_first_tokens: {config.keep_first_tokens} needs the model's decoder stack "
                f"(get_decoder()) to find each row's first real tokens, and {name} has none (hint: "
                "dropout.keep_first_tokens=0)")
    return problems


def _layout_note(model: torch.nn.Module) -> str:
    """` (its GPT2Block layers lack `self_attn`; their children: ln_1, attn, ln_2, mlp)`: what the repeated
    block of the model has instead, or nothing when there is no ModuleList of blocks."""
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)), None)
    if blocks is None:
        return ""
    block = blocks[0]
    missing = [name for name in ("self_attn", "mlp") if not isinstance(getattr(block, name, None), torch.nn.Module)]
    children = ", ".join(name for name, _ in block.named_children())
    return (f" (its {type(block).__name__} layers lack {' and '.join(f'`{n}`' for n in missing)}; "
            f"their children: {children})")


@dataclass
class DropoutHandle:
    """What apply_dropout changed on a model; `remove()` restores it.

    A `scoped` handle acts only between `enter()` and `exit()` (or inside `activated()`): outside, its hooks pass
    everything through and the model runs its own attention implementation, so a plain call of the model computes
    what the stock model computes. Entries nest; `active` is True inside any of them (always, when not scoped)."""

    model: PreTrainedModel
    config: DropoutConfig
    previous_attn: str | None
    layers: list[torch.nn.Module] = field(default_factory=list)   # every decoder layer, in order
    selected: list[int] = field(default_factory=list)             # indices of the layers that get dropout
    attention_modules: list[torch.nn.Module] = field(default_factory=list)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    scoped: bool = False
    # scoped: (config object, its attention implementation outside, inside) for every config set_attn_implementation
    # changed; switching is a plain attribute write, cheap enough for every forward (and every backward)
    attn_switch: list[tuple[object, str | None, str | None]] = field(default_factory=list)
    depth: int = 0

    @property
    def active(self) -> bool:
        return not self.scoped or self.depth > 0

    def enter(self) -> None:
        self.depth += 1
        if self.depth == 1:
            for config, _, inside in self.attn_switch:
                config._attn_implementation_internal = inside

    def exit(self) -> None:
        if self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            for config, outside, _ in self.attn_switch:
                config._attn_implementation_internal = outside

    def reset(self) -> None:
        """Leave every entry (one a failed backward never left)."""
        while self.depth:
            self.exit()

    @contextlib.contextmanager
    def activated(self):
        self.enter()
        try:
            yield self
        finally:
            self.exit()

    def remove(self) -> None:
        self.reset()
        self.attn_switch = []
        for hook in self.hooks:
            hook.remove()
        for module in self.attention_modules:
            for attr in (attention.CONFIG_ATTR, attention.SINK_ATTR, attention.GATE_ATTR):
                if hasattr(module, attr):
                    delattr(module, attr)
        if self.previous_attn is not None:
            self.model.set_attn_implementation(self.previous_attn)
        self.hooks, self.attention_modules, self.previous_attn = [], [], None
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)


def apply_dropout(model: torch.nn.Module, config: DropoutConfig, scoped: bool = False) -> DropoutHandle:
    """Apply `config` to `model` (a PreTrainedModel or a PeftModel) in place and return a handle to undo it.

    Only the layers `config.layers` selects get dropout (the latter half by default, as in the paper).
    Attention-side dropout switches the model to the registered "hiddenkey" attention function (sdpa
    underneath; unselected layers take its plain sdpa path); hidden dropout adds a forward hook on each selected
    layer's MLP. Masks are drawn only in training mode: in eval mode the model computes exactly what it
    computed before. Applying again replaces the previous configuration. `scoped=True` (what HiddenKeyObjective
    uses): nothing acts until `handle.enter()` / `with handle.activated():`.
    """
    base = unwrap_model(model)
    previous: DropoutHandle | None = getattr(base, _HANDLE_ATTR, None)
    if previous is not None:
        previous.remove()
    layers = decoder_layers(base)
    selected = config.layer_indices(len(layers))
    handle = DropoutHandle(model=base, config=config, previous_attn=None, layers=layers, selected=selected,
                           scoped=scoped)
    sink = None
    if config.keep_first_tokens and config.active:
        sink = SinkTokens(config.keep_first_tokens)

        def record(module, args, kwargs):
            if handle.active:
                sink.record(module, args, kwargs)

        handle.hooks.append(base.get_decoder().register_forward_pre_hook(record, with_kwargs=True))

    if config.touches_attention:
        if not base._can_set_attn_implementation():
            raise UnsupportedModelError(
                f"{type(base).__name__} does not dispatch attention through transformers' AttentionInterface, so "
                "key/attention dropout cannot be attached; use only `hidden` dropout with this model"
            )
        attention.register()
        current = base.config._attn_implementation
        if current != attention.ATTN_NAME:
            configs = _attn_configs(base)
            outside = [c._attn_implementation_internal for c in configs]
            base.set_attn_implementation(attention.ATTN_NAME)
            if scoped:
                handle.attn_switch = [(c, before, c._attn_implementation_internal)
                                      for c, before in zip(configs, outside)]
                for c, before in zip(configs, outside):
                    c._attn_implementation_internal = before
            else:
                handle.previous_attn = current
        for i in selected:
            setattr(layers[i].self_attn, attention.CONFIG_ATTR, config)
            if sink is not None:
                setattr(layers[i].self_attn, attention.SINK_ATTR, sink)
            if scoped:  # also when the model already runs the hiddenkey function outside the scope
                setattr(layers[i].self_attn, attention.GATE_ATTR, lambda: handle.active)
            handle.attention_modules.append(layers[i].self_attn)

    if config.touches_hidden:
        hook = make_mlp_hook(config.hidden, sink, gate=lambda: handle.active)
        handle.hooks += [layers[i].mlp.register_forward_hook(hook) for i in selected]

    setattr(base, _HANDLE_ATTR, handle)
    return handle


def _attn_configs(base: PreTrainedModel) -> list:
    """Every config object whose attention implementation set_attn_implementation may change."""
    found, seen = [], set()

    def add(config):
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation_internal"):
            seen.add(id(config))
            found.append(config)
            for key in getattr(config, "sub_configs", {}) or {}:
                add(getattr(config, key, None))

    add(base.config)
    for module in base.modules():
        if isinstance(module, PreTrainedModel):
            add(module.config)
    return found


def dropout_handle(model: torch.nn.Module) -> DropoutHandle | None:
    """The handle of the configuration applied to `model`, or None."""
    return getattr(unwrap_model(model), _HANDLE_ATTR, None)


def remove_dropout(model: torch.nn.Module) -> None:
    """Undo apply_dropout on `model`; a no-op when nothing is applied."""
    handle = getattr(unwrap_model(model), _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
