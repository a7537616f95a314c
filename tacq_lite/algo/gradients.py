"""Gradient saliency for TaCQ: G = Σ_samples |dL/dW| over the calibration set.

Task-Circuit Quantization (Xiao et al., 2025, arXiv 2504.07389, Sec. 3.2) estimates how much
each weight matters for the task from the gradient of the task loss. As in the authors' code,
every calibration sample gets its own forward/backward pass (batch size 1, float32, the model
in eval mode), and the *absolute value* of each per-sample gradient is summed: signs that
cancel across samples would hide weights that matter a lot for some of them.

Text windows [n, seq_len] are scored with next-token loss on every position. Task samples,
(input_ids [T], loss_mask [T]) pairs, are scored only where loss_mask is True (the answer),
so G measures the weights that produce the answer rather than the ones that model the prompt.
The loss of a sample is the mean over its scored tokens, so every sample weighs the same.

Memory design. A per-sample gradient is never stored: a `post_accumulate_grad_hook` on each
targeted weight folds |grad| into its accumulator the moment autograd has written it and then
frees it (p.grad = None), so at most one layer's gradient exists besides the accumulators.
Parameters other than the targeted linears get requires_grad=False, so autograd computes no
gradient for embeddings, norms or the LM head. What remains is
  * the accumulators: one [rows, cols] tensor per linear (two with squares=True);
  * the activations kept for backward: about layers × seq_len × (a few × hidden).
For an 8B model (the authors needed three GPUs) this is 28 GiB of fp32 weights + 28 GiB of fp32
accumulators + activations. Two knobs cut it: `accum_device="cpu"` moves the accumulators to host
memory (one device-to-host copy per linear per sample), `accum_dtype=torch.bfloat16` halves
them (8 significant bits: fine for ranking, but a bf16 sum of many small terms drifts; prefer
fp32 on the CPU), and `checkpointing=True` recomputes each decoder layer in backward instead of
keeping its activations (transformers only checkpoints in training mode, so the model is put in
train mode with every dropout disabled for the duration).

A model split over GPUs by a device_map (model/placement.py) runs as it is: each hook adds into an
accumulator on its own weight's device, so every GPU holds the accumulators of its own layers.
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import placement, walk

LOSS_KINDS = ("auto", "all", "answer")


class GradResult(NamedTuple):
    G: dict[str, torch.Tensor]  # linear -> [rows, cols] Σ_samples |dL/dW|
    G2: dict[str, torch.Tensor] | None  # linear -> [rows, cols] Σ_samples (dL/dW)² (squares=True), else None
    n_samples: int  # forward/backward passes run
    n_tokens: int  # predicted tokens that entered the loss, over all samples
    seconds_per_sample: float  # wall seconds per forward+backward (GradientWorker: from its start, over all samples)


def as_pairs(samples, loss: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalize samples to (input_ids [T], loss_mask [T]) pairs; mask True = token is scored."""
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss={loss!r} is unknown; choose one of {LOSS_KINDS}.")
    if isinstance(samples, torch.Tensor):
        if samples.dim() != 2 or samples.dtype != torch.long:
            raise ValueError(f"text samples must be a LongTensor [n, seq_len], got {samples.dtype} "
                             f"{tuple(samples.shape)}.")
        if loss == "answer":
            raise ValueError("loss='answer' needs (input_ids, loss_mask) pairs; text windows have no answer span.")
        return [(ids, torch.ones_like(ids, dtype=torch.bool)) for ids in samples]
    pairs = []
    for i, pair in enumerate(samples):
        ids, mask = pair
        if ids.dim() != 1 or ids.dtype != torch.long or mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"sample {i}: need input_ids LongTensor [T] and loss_mask bool [T] of the same length.")
        if loss == "all":  # score the prompt too, as for plain text
            mask = torch.ones_like(mask)
        if not mask[1:].any():  # position 0 has nothing before it to predict it
            raise ValueError(
                f"sample {i} has no scored token after position 0 (loss_mask is empty): its loss, and so its "
                "gradient, would be undefined. Drop it or mark its answer tokens True."
            )
        pairs.append((ids, mask))
    if not pairs:
        raise ValueError("no samples given.")
    return pairs


def sample_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions t >= 1 with mask[t] True (a scalar).

    The LM head runs only where the loss reads it: at t - 1 for every scored token t
    (transformers' `logits_to_keep`). On a text window that drops one position of 512; on a
    task sample scored on its answer it drops most of the [T, vocab] logits, and with them the
    largest tensors of the backward pass. Models whose forward lacks `logits_to_keep` get the
    full logits, then the same rows are picked.
    """
    pos = mask[1:].nonzero().squeeze(1)  # [k] positions whose next token is scored
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=ids[None], use_cache=False, logits_to_keep=pos).logits[0]  # [k, vocab]
    else:
        logits = model(input_ids=ids[None], use_cache=False).logits[0, pos]  # [k, vocab]
    return F.cross_entropy(logits.float(), ids[pos + 1])  # mean over the k scored tokens


HEAD_CHUNK = 32  # scored positions whose logits exist at once in backward_sample


def _chunkable_head(model: nn.Module):
    """(decoder, lm_head) when the logits are exactly lm_head(decoder's last hidden state), else None.

    Llama, Qwen2 and Mistral heads are; a model that caps or scales its logits (Gemma 2's
    final_logit_softcapping, a logit_scale) gets the plain path."""
    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    cfg = getattr(model, "config", None)
    if not isinstance(inner, nn.Module) or not isinstance(head, nn.Linear):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    return inner, head


def backward_sample(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Backward of sample_loss's loss (the mean next-token NLL over the scored tokens); returns the
    loss, or None when no targeted weight is reached (nothing requires grad).

    The LM head's logits are the largest tensors of a sample's backward pass: [k, vocab] float32,
    three times (the logits, the log-softmax saved for backward, their gradient), 300 MB for a
    512-token window of a 49,152-token vocabulary. Here the decoder runs once, its last hidden
    states are detached, and the head + cross-entropy run HEAD_CHUNK positions at a time, each
    chunk's backward adding into the hidden states' gradient, which then goes back through the
    decoder once. Nothing is recomputed; only one chunk's logits exist at a time. The gradient is
    the same function; float32 rounding of the head's part can differ in the last bits.
    """
    parts = _chunkable_head(model)
    if parts is None:
        loss = sample_loss(model, ids, mask)
        if loss.grad_fn is None:
            return None
        loss.backward()
        return loss.detach()
    inner, head = parts
    pos = mask[1:].nonzero().squeeze(1)  # [k] positions whose next token is scored
    last = inner(input_ids=ids[None], use_cache=False).last_hidden_state  # [1, T, hidden]
    hidden = last[0, pos.to(last.device)]  # [k, hidden]; on the final norm's device (a device_map's last)
    if hidden.grad_fn is None:
        return None
    leaf = hidden.detach().requires_grad_()  # [k, hidden]; its .grad collects the chunks' gradients
    targets = ids[pos + 1]  # [k]
    total = torch.zeros((), device=hidden.device)
    for a in range(0, pos.numel(), HEAD_CHUNK):
        logits = head(leaf[a : a + HEAD_CHUNK]).float()  # [<=HEAD_CHUNK, vocab] on lm_head's device
        part = F.cross_entropy(logits, targets[a : a + HEAD_CHUNK].to(logits.device), reduction="sum") / pos.numel()
        part.backward()
        total += part.detach().to(total.device)
    hidden.backward(leaf.grad)
    return total


def _blocked_error(names: Sequence[str], n_targets: int) -> RuntimeError:
    return RuntimeError(
        f"No gradient reached {len(names)} of {n_targets} targeted weights (e.g. {', '.join(list(names)[:3])}). "
        "Something in the forward pass cuts them off from the loss: a module or hook that returns .detach()ed "
        "outputs, a custom forward under torch.no_grad(), or weights that are not plain leaf tensors. Remove "
        "the detaching hook/wrapper (or reload the model) and run again; tacq_lite sets requires_grad itself."
    )


def _enable_checkpointing(model: nn.Module) -> None:
    enable = (getattr(model, "activation_checkpointing_enable", None)
              or getattr(model, "gradient_checkpointing_enable", None))
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; use checkpointing=False.")
    enable()
    model.train()  # transformers checkpoints only in training mode ...
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # ... but the gradients must be the eval-mode ones
    if getattr(model.config, "attention_dropout", 0.0):
        warnings.warn("attention_dropout > 0 is active while checkpointing; the gradients will be noisy.")


def _disable_checkpointing(model: nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


@contextlib.contextmanager
def gradient_session(model: nn.Module, G: dict, G2: dict | None, *, checkpointing: bool = False):
    """Set the model up for accumulation; yields run(ids, mask) -> scored tokens, one sample each.

    Inside, only the targeted weights require grad, and a hook on each folds |grad| (and grad²)
    into G (G2) and frees the gradient. On exit the model is as it was: same requires_grad
    flags, training mode and no .grad.
    """
    targets = {name: lin.weight for name, lin in walk.named_linears(model).items()}
    device = placement.input_device(model)  # with a device_map the layers' own hooks move the activations on
    fired: set[str] = set()

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            g = p.grad  # [rows, cols] this sample's gradient; freed below
            if G2 is not None:
                G2[name].add_(g.square().to(G2[name].device))
            # abs per sample, before summing (Sec. 3.2). add_ casts to the accumulator's dtype on the fly.
            G[name].add_(g.abs_().to(G[name].device))
            p.grad = None
            fired.add(name)

        return hook

    def run(ids: torch.Tensor, mask: torch.Tensor) -> int:
        fired.clear()
        if backward_sample(model, ids.to(device), mask.to(device)) is None:
            raise _blocked_error(list(targets), len(targets))
        if len(fired) != len(targets):
            raise _blocked_error([n for n in targets if n not in fired], len(targets))
        return int(mask[1:].sum())

    frozen = [n for n, p in model.named_parameters() if p.is_inference()]
    if frozen:  # their requires_grad could neither be set nor restored
        raise RuntimeError(
            f"{len(frozen)} parameters (e.g. {frozen[0]}) are inference tensors, made under torch.inference_mode(), "
            "and cannot take gradients. Load the model outside torch.inference_mode(), or replace them by "
            "plain clones: `for p in model.parameters(): p.data = p.data.clone()` outside inference mode."
        )
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in targets.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(name)))
        model.eval()
        if checkpointing:
            _enable_checkpointing(model)
        with torch.inference_mode(False), torch.enable_grad():
            yield run
    finally:
        for h in handles:
            h.remove()
        if checkpointing:
            _disable_checkpointing(model)
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)


def check_float32(model: nn.Module) -> None:
    if any(lin.weight.dtype != torch.float32 for lin in walk.named_linears(model).values()):
        warnings.warn("TaCQ's gradients are computed in float32 (as the authors do); this model is not float32.")


def accumulate_gradients(
    model: nn.Module,
    samples: torch.Tensor | Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss: str = "auto",  # auto: "answer" for (ids, mask) pairs, "all" for text windows
    squares: bool = False,  # also Σ g² (the Fisher diagonal of SqueezeLLM-style scores)
    accum_dtype: torch.dtype = torch.float32,
    accum_device: torch.device | str | None = None,  # None: beside each weight
    checkpointing: bool = False,
    progress: bool = True,
) -> GradResult:
    """One forward/backward per sample; returns Σ|g| (and Σg²) per targeted linear weight.

    The model comes back unchanged: same requires_grad flags, training mode and no .grad.
    run/parallel.py's GradientWorker shares the same passes between this process and a forked one.
    """
    from tqdm.auto import tqdm

    pairs = as_pairs(samples, loss)
    check_float32(model)
    weights = {n: lin.weight for n, lin in walk.named_linears(model).items()}
    G = {n: torch.zeros(w.shape, dtype=accum_dtype, device=accum_device or w.device) for n, w in weights.items()}
    G2 = {n: torch.zeros_like(g) for n, g in G.items()} if squares else None
    start, n_tokens = time.perf_counter(), 0
    with gradient_session(model, G, G2, checkpointing=checkpointing) as run:
        for ids, mask in tqdm(pairs, desc="gradients", disable=not progress):
            n_tokens += run(ids, mask)
    seconds = (time.perf_counter() - start) / len(pairs)
    return GradResult(G, G2, len(pairs), n_tokens, seconds)


