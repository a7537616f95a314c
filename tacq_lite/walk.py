"""Model structure, in one place: which linears TaCQ quantizes and how to walk them.

Supports decoder-only models laid out like Llama, Qwen2, Mistral and Gemma
(`model.model.layers[i].self_attn.{q,k,v,o}_proj`, `.mlp.{gate,up,down}_proj`). Every other
module of tacq_lite receives linears or tensors from here and never walks a model itself.

The true-sequential pass follows GPTQ (Frantar et al., 2022, Sec. 4 / reference `llama.py`):
inputs of decoder layer 0 are captured once; inside each layer the linears are quantized
in sub-groups (q/k/v, o, gate/up, down) so that each sub-group sees inputs produced by the
already-quantized ones; the layer's quantized outputs feed the next layer.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# True-sequential sub-groups of one decoder layer, in execution order.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES = tuple(n for group in SEQUENTIAL_GROUPS for n in group)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-style causal LM."""
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise NotImplementedError(
            "GPT-2-style Conv1D layers are not supported; use a Llama/Qwen2/Mistral/Gemma-style model."
        )
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise NotImplementedError(
            f"{type(model).__name__} has no `model.layers`; tacq_lite supports Llama-style decoders "
            "(Llama, Qwen2, Mistral, Gemma)."
        )
    return layers


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """{"self_attn.q_proj": Linear, ...} for one decoder layer, in execution order."""
    found = {}
    for name in LINEAR_NAMES:
        module = layer.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{name} is a {type(module).__name__}, expected nn.Linear.")
        found[name] = module
    return found


def named_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every targeted linear: {"model.layers.{i}.self_attn.q_proj": Linear, ...}."""
    return {
        f"model.layers.{i}.{name}": module
        for i, layer in enumerate(decoder_layers(model))
        for name, module in layer_linears(layer).items()
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (e.g. a linear by a QuantLinear)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, leaf):
        raise KeyError(f"{type(model).__name__} has no submodule {name!r}.")
    setattr(parent, leaf, module)


@torch.no_grad()
def apply_to_linears(model: nn.Module, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Replace each targeted weight W by fn(name, W) (same shape), in place."""
    for name, module in named_linears(model).items():
        new = fn(name, module.weight.data)
        if new.shape != module.weight.shape:
            raise ValueError(f"{name}: fn returned shape {tuple(new.shape)}, expected {tuple(module.weight.shape)}.")
        module.weight.data.copy_(new)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the needed inputs are seen."""


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Run the model up to decoder layer 0 for each window.

    windows: LongTensor [n, seq_len]. Returns (hidden states, one [1, seq_len, hidden] each,
    the keyword arguments layer 0 received: position embeddings, mask, ...), shared by all
    windows since they have the same length.
    """
    layer0 = decoder_layers(model)[0]
    inps: list[torch.Tensor] = []
    kwargs: dict = {}

    def grab(_module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        inps.append(hidden.detach())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for window in windows:
            try:
                model(window[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return inps, kwargs


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def sequential_pass(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    make_stats: Callable[[str, nn.Linear], object],
    finish: Callable[[str, nn.Linear, object], None],
    progress: bool = True,
) -> None:
    """True-sequential layer-by-layer pass (GPTQ's driver), generic in the per-linear work.

    make_stats(name, linear) returns an object with `add_batch(x)`; after every window of a
    sub-group has been seen, finish(name, linear, stats) must update linear.weight in place.
    Only one layer's activations ([n, seq_len, hidden] twice) are held at a time.
    """
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    inps, kwargs = capture_layer0_inputs(model, windows)
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress)):
        linears = layer_linears(layer)
        for group in SEQUENTIAL_GROUPS:
            stats = {name: make_stats(f"model.layers.{i}.{name}", linears[name]) for name in group}
            seen: set[str] = set()

            def hook(module, args, name):
                stats[name].add_batch(args[0].detach())
                seen.add(name)
                if len(seen) == len(group):
                    raise _Stop  # the rest of the layer is not needed for this sub-group

            # Pre-hooks: the last linear of a sub-group (v_proj, up_proj, down_proj, ...) is
            # stopped before its own matmul, which nothing here needs.
            handles = [linears[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in group]
            try:
                for x in inps:
                    seen.clear()
                    try:
                        layer(x, **kwargs)
                    except _Stop:
                        pass
            finally:
                for h in handles:
                    h.remove()
            for name in group:
                finish(f"model.layers.{i}.{name}", linears[name], stats[name])
        inps = [_layer_output(layer(x, **kwargs)) for x in inps]  # quantized outputs feed layer i+1

