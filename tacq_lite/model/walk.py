"""Model structure, in one place: which linears TaCQ quantizes and how to walk them.

Supports decoder-only models laid out like Llama, Qwen2, Mistral and Gemma
(`model.model.layers[i].self_attn.{q,k,v,o}_proj`, `.mlp.{gate,up,down}_proj`). Every other
module of tacq_lite receives linears or tensors from here and never walks a model itself.

The true-sequential pass follows GPTQ (Frantar et al., 2022, Sec. 4 / reference `llama.py`):
inputs of decoder layer 0 are captured once; inside each layer the linears are quantized
in sub-groups (q/k/v, o, gate/up, down) so that each sub-group sees inputs produced by the
already-quantized ones; the layer's quantized outputs feed the next layer. A Llama-style layer
is run stage by stage from stored intermediate results, so each layer costs about one forward
per window; any other layer is re-run from its input for each sub-group.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from . import placement

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
def capture_layer0_inputs(model: nn.Module, windows: torch.Tensor, *,
                          device: torch.device | None = None) -> tuple[list[torch.Tensor], dict]:
    """Run the model up to decoder layer 0 for each window.

    windows: LongTensor [n, seq_len]. Returns (hidden states, one [1, seq_len, hidden] each,
    the keyword arguments layer 0 received: position embeddings, mask, ...), shared by all
    windows since they have the same length. device: where the modules before layer 0
    (embeddings, rotary tables) run, moved there for the duration (None: where they are; the
    hidden states then come on the embedding's device, and sequential_pass moves them on).
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
    before = placement.outside_layers(model, decoder_layers(model)) if device is not None else []
    device = placement.input_device(model) if device is None else torch.device(device)
    try:
        with contextlib.ExitStack() as stack:
            for m in before:
                stack.enter_context(placement.onloaded(m, device))
            for window in windows:
                try:
                    model(window[None].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    for key in ("cache", "past_key_values"):  # the cache keyword's name in newer and older transformers
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    return inps, kwargs


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def _inputs_of(run: Callable[[], object], watch: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Call run() (one forward) until every module in `watch` has received its input.

    Returns {name: that input}. Pre-hooks stop the forward before the last watched module's
    own matmul, which nothing here needs.
    """
    got: dict[str, torch.Tensor] = {}

    def hook(args, name):
        got[name] = args[0].detach()
        if len(got) == len(watch):
            raise _Stop

    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: hook(args, n)) for n, m in watch.items()]
    try:
        run()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _staged_layer(layer: nn.Module, inps: list[torch.Tensor], kwargs: dict,
                  quantize_group: Callable[..., None]) -> list[torch.Tensor]:
    """One Llama-style decoder layer, run sub-group by sub-group over all windows.

    Each stage starts from the previous stage's stored result, so the layer costs about one
    forward per window; re-running the layer from its input for every sub-group costs about
    2.4. quantize_group(group, inputs, shared=False) must quantize the group's linears from
    inputs, an iterable of {linear name: its input} per window, before it returns; shared=True
    says every linear of the group reads the same tensor. Returns the layer's outputs,
    computed with the quantized linears; `inps` is emptied.
    """
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = SEQUENTIAL_GROUPS
    # Each stage's list is emptied while the next one fills (_consume), and `inps` too once the
    # residual has used it, so about two stages' activations exist at a time, not all of them.
    normed = [layer.input_layernorm(x) for x in inps]  # q/k/v's input, kept for the attention below
    quantize_group(qkv, (dict.fromkeys(qkv, n) for n in normed), shared=True)
    # The attention context (o_proj's input) with the quantized q/k/v.
    ctx = _consume(normed, lambda n: _inputs_of(lambda: attn(hidden_states=n, **kwargs), {o[0]: attn.o_proj})[o[0]])
    quantize_group(o, ({o[0]: c} for c in ctx))
    hidden = [x + attn.o_proj(c) for x, c in zip(inps, _drain(ctx))]  # residual stream after attention
    inps.clear()  # consumed: the caller's list of this layer's inputs
    normed = [layer.post_attention_layernorm(h) for h in hidden]  # gate/up's input
    quantize_group(gate_up, (dict.fromkeys(gate_up, n) for n in normed), shared=True)
    acts = _consume(normed, lambda n: mlp.act_fn(mlp.gate_proj(n)) * mlp.up_proj(n))
    quantize_group(down, ({down[0]: a} for a in acts))
    return [h.add_(mlp.down_proj(a)) for h, a in zip(hidden, _drain(acts))]  # hidden's tensors are its own


def _consume(items: list, fn: Callable) -> list:
    """[fn(x) for x in items], emptying `items` as it goes (each input freed once mapped)."""
    return [fn(x) for x in _drain(items)]


def _drain(items: list):
    """Yield the items of a list from the front, removing each from the list first."""
    items.reverse()
    while items:
        yield items.pop()


def _can_stage(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> bool:
    """True when _staged_layer reproduces the layer's own forward on window x.

    Llama, Qwen2 and Mistral layers pass; a layer with extra norms or another residual layout
    (Gemma 2, say) fails and is walked the generic way.
    """
    if not all(hasattr(layer, a) for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")):
        return False
    if not all(hasattr(layer.mlp, a) for a in ("act_fn", "gate_proj", "up_proj", "down_proj")):
        return False
    try:
        staged = _staged_layer(layer, [x], kwargs, lambda _group, _inputs, shared=False: None)[0]
    except Exception:  # noqa: BLE001 - any failure means "walk this layer the generic way"
        return False
    own = _layer_output(layer(x, **kwargs))
    return staged.shape == own.shape and torch.allclose(staged, own, rtol=1e-4, atol=1e-5 * own.abs().max().item())


@torch.no_grad()
def sequential_pass(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    make_stats: Callable[[str, nn.Linear], object],
    finish: Callable[[str, nn.Linear, object], None],
    progress: bool = True,
    staged: bool | None = None,
    device: torch.device | str | None = None,
    after_layer: Callable[[int, nn.Module], None] | None = None,
) -> None:
    """True-sequential layer-by-layer pass (GPTQ's driver), generic in the per-linear work.

    make_stats(name, linear) returns an object with `add_batch(x)`; after every window of a
    sub-group has been seen, finish(name, linear, stats) must update linear.weight in place.

    staged=None (default) runs a Llama-style layer stage by stage from stored intermediate
    results (about one layer forward per window) whenever that reproduces the layer's own
    forward (checked on the first window, once per kind of layer), and any other layer by
    re-running it from its input for each sub-group, stopped early by hooks. Both see the same
    inputs. staged=False forces the second way; staged=True
    raises if a layer cannot be staged. In the staged way, linears that read one input (q/k/v,
    gate/up) share statistics: if the stats object has copy_stats_from(other), only the first
    linear of the sub-group gets add_batch and the others copy from it. Memory: one layer's
    activations for all windows, at most [n, seq_len, hidden] three times plus
    [n, seq_len, intermediate] once.

    device: the compute device. Sequential onloading: each layer is moved there, worked on and
    moved back (placement.onloaded), so the device holds one layer and the activations, never the
    model. None: each layer computes where its weights are, and its inputs follow it there (a
    model loaded with a device_map, which must keep each decoder layer on one device; one spread
    over devices cannot take a device). after_layer(i, layer), if given, runs once layer i's
    outputs for the next layer are computed, while it is still on the compute device.
    """
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    device = None if device is None else torch.device(device)
    if device is not None and placement.is_split(model):
        raise ValueError(f"the model is spread over {', '.join(map(str, placement.model_devices(model)))} by a "
                         "device_map; its layers compute where they are: pass device=None.")
    inps, kwargs = capture_layer0_inputs(model, windows, device=device)
    stageable: dict[tuple, bool] = {}  # checked once per layer class and forward function
    for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress)):
        if device is None and len(placement.model_devices(layer)) > 1:
            raise ValueError(f"decoder layer {i} has weights on {', '.join(map(str, placement.model_devices(layer)))}; "
                             f"a device_map must keep each decoder layer on one device (map model.layers.{i} whole).")
        with placement.onloaded(layer, device):
            here = placement.module_device(layer)
            for j, x in enumerate(inps):  # the previous layer's outputs, moved one at a time (no-op on one device)
                inps[j] = x.to(here)
            inps = _layer_pass(i, layer, inps, placement.to_device(kwargs, here), make_stats, finish, staged,
                               stageable)
            if after_layer is not None:
                after_layer(i, layer)


def _layer_pass(i, layer, inps, kwargs, make_stats, finish, staged, stageable) -> list[torch.Tensor]:
    """sequential_pass on decoder layer i; returns its outputs (the next layer's inputs)."""
    linears = layer_linears(layer)

    def quantize_group(group, inputs, shared=False, i=i, linears=linears):
        stats = {name: make_stats(f"model.layers.{i}.{name}", linears[name]) for name in group}
        # In the staged way every linear of a sub-group reads one tensor; stats objects that
        # can copy another's (GPTQ's Hessian) are fed once.
        share = shared and all(hasattr(stats[n], "copy_stats_from") for n in group)
        fed = group[:1] if share else group
        for window in inputs:
            for name in fed:
                stats[name].add_batch(window[name])
        for name in group[1:] if share else ():
            stats[name].copy_stats_from(stats[group[0]])
        for name in group:
            finish(f"model.layers.{i}.{name}", linears[name], stats[name])

    kind = (type(layer), getattr(layer.forward, "__func__", layer.forward))  # a patched forward is its own kind
    if staged is not False and kind not in stageable:
        stageable[kind] = _can_stage(layer, inps[0], kwargs)
    use_stages = staged is not False and stageable[kind]
    if staged and not use_stages:
        raise NotImplementedError(
            f"decoder layer {i} ({type(layer).__name__}) does not follow the Llama layout "
            "(norm, attention, residual, norm, gated MLP, residual); pass staged=None."
        )
    if use_stages:
        return _staged_layer(layer, inps, kwargs, quantize_group)
    for group in SEQUENTIAL_GROUPS:
        watch = {name: linears[name] for name in group}
        quantize_group(group, (_inputs_of(lambda x=x: layer(x, **kwargs), watch) for x in inps))
    return [_layer_output(layer(x, **kwargs)) for x in inps]  # quantized outputs feed layer i+1
