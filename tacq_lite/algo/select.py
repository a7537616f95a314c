"""Choosing the kept weights: TaCQ's global top-k keep-mask (or top columns) and its report.

Task-Circuit Quantization (Xiao et al., 2025, arXiv 2504.07389, Sec. 3.3) keeps the
k = ratio × (number of targeted weights) highest-scoring weights of the whole model in 16-bit,
ranked *globally* over every targeted linear (0.35 % in the paper), so that layers that matter
more for the task get more of the budget.

k is the nearest integer to ratio × total, halves rounded up (k = floor(ratio · total + ½)).
Ties at the k-th score are broken by the lower global flat index: linears in the order of
the `scores` dict (walk.named_linears' execution order), row-major inside each matrix, so the
mask is a deterministic function of the scores. The k-th largest value is found without a
concatenated copy of all scores: a strided sample bounds it from below, and only the values
above that bound (a few times k) are gathered and ranked (`kth_largest`): ~9 s instead of
~14 s for a concatenated topk over SmolLM2-135M's 106 M scores on a busy 2-core CPU.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Mapping, NamedTuple

import torch


def n_keep(total: int, ratio: float) -> int:
    """The budget k = floor(ratio · total + ½) for ratio in [0, 1)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}.")
    return min(total, math.floor(ratio * total + 0.5))


def _check_scores(scores: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    if not scores:
        raise ValueError("no scores given.")
    flat = []
    for name, s in scores.items():
        s = s.float().reshape(-1)  # [rows * cols]; no copy for contiguous float32
        lo, hi = torch.aminmax(s)  # one pass; NaN propagates into both
        if not (lo >= 0 and hi < float("inf")):
            raise ValueError(f"scores of {name} must be finite and >= 0 (selectors return magnitudes); look for "
                             "NaN/Inf in that linear's selector inputs (W, G, G2, QW, H).")
        flat.append(s)
    return flat


def _candidates(flat_of: Callable[[], Iterable[torch.Tensor]], total: int, k: int, sample_size: int = 1 << 20):
    """(t, [(idx, vals)] per tensor): t is the k-th largest value; idx [c] (ascending flat
    indices) and vals [c] hold every entry >= a bound t0 <= t, so also every entry >= t.

    flat_of() yields the flat score tensors, in order, each time it is called: a list's iterator,
    or a generator that computes one linear's scores at a time (so the scores of all linears
    never exist at once; it is called twice or more and must yield the same values each time).
    A strided sample sets t0 so that about 3k entries lie above it; if fewer than k do, t0 is
    lowered (down to 0 = everything). Only the speed depends on the sample, never the result.
    """
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be in [1, {total}].")
    stride = max(1, total // sample_size)
    sample = torch.cat([s[::stride].cpu() for s in flat_of()])  # [m] about sample_size values
    j = 3 * k * sample.numel() // total + 16  # sample entries expected above the bound
    while True:
        t0 = sample.topk(j).values[-1].item() if j < sample.numel() else 0.0
        cand = []
        for s in flat_of():  # one pass per tensor
            i = (s >= t0).nonzero()[:, 0]
            cand.append((i, s[i]))
        if sum(i.numel() for i, _ in cand) >= k:
            break
        j *= 4
    vals = torch.cat([v.cpu() for _, v in cand])  # [c] a few times k
    return vals.kthvalue(vals.numel() - k + 1).values.item(), cand


def kth_largest(scores: list[torch.Tensor], k: int) -> float:
    """The k-th largest value over all tensors (1 <= k <= total), each float32 >= 0."""
    flat = [s.float().reshape(-1) for s in scores]
    return _candidates(lambda: iter(flat), sum(s.numel() for s in flat), k)[0]


def select_topk(scores: Mapping[str, torch.Tensor], *, ratio: float) -> dict[str, torch.Tensor]:
    """Global top-k keep-masks {name: bool [rows, cols]} over all linears (True = keep in 16-bit)."""
    flat = _check_scores(scores)
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    return _topk_masks(lambda: iter(flat), shapes, [s.device for s in flat], ratio)


def select_topk_streaming(score_of: Callable[[str], torch.Tensor], shapes: Mapping[str, tuple[int, int]], *,
                          ratio: float) -> dict[str, torch.Tensor]:
    """select_topk's masks, with the scores made one linear at a time by score_of(name) and dropped.

    score_of is called two or more times per linear (in the order of `shapes`) and must return the
    same tensor each time; the masks equal select_topk's on the same scores, ties included. Peak
    memory: one linear's scores, the candidates (a few times k) and the masks (1 byte per weight).
    """
    names = list(shapes)
    devices = {}

    def flat_of():
        for name in names:
            s = score_of(name)
            if tuple(s.shape) != tuple(shapes[name]):
                raise ValueError(f"score_of({name!r}) has shape {tuple(s.shape)}, expected {tuple(shapes[name])}.")
            devices[name] = s.device
            yield _check_scores({name: s})[0]

    return _topk_masks(flat_of, shapes, devices, ratio)


def _topk_masks(flat_of, shapes: Mapping[str, tuple], devices, ratio: float) -> dict[str, torch.Tensor]:
    total = sum(math.prod(shape) for shape in shapes.values())
    k = n_keep(total, ratio)
    if k == 0:
        return {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
    t, cand = _candidates(flat_of, total, k)
    devices = devices if isinstance(devices, list) else [devices[n] for n in shapes]
    masks = {name: torch.zeros(shape, dtype=torch.bool, device=d) for (name, shape), d in zip(shapes.items(), devices)}
    need = k - sum(int((v > t).sum()) for _, v in cand)  # ties at t still to take, 1 or more
    for m, (idx, v) in zip(masks.values(), cand):
        tied = idx[v == t][:need]  # ascending flat index: the lowest go first
        m.view(-1)[idx[v > t]] = True  # [rows * cols] strictly above the threshold
        m.view(-1)[tied] = True
        need -= tied.numel()
    return masks


def select_columns(
    column_scores: Mapping[str, torch.Tensor], *, shapes: Mapping[str, tuple[int, int]], ratio: float
) -> dict[str, torch.Tensor]:
    """Whole-column keep-masks (OWQ) from a score per column [cols], ranked globally.

    A column of a linear with `rows` outputs costs `rows` weights. Columns are taken in
    descending score (ties: lower global column index) while the total stays <= k, so the
    masks keep at most k weights and only whole columns.
    """
    if set(column_scores) != set(shapes):
        raise ValueError("column_scores and shapes must name the same linears.")
    total = sum(r * c for r, c in shapes.values())
    k = n_keep(total, ratio)
    names = list(column_scores)
    for n in names:
        if column_scores[n].shape != (shapes[n][1],):
            raise ValueError(f"{n}: column score shape {tuple(column_scores[n].shape)}, expected ({shapes[n][1]},).")
    _check_scores(column_scores)  # a NaN would sort first and be kept
    s = torch.cat([column_scores[n].float().cpu() for n in names])  # [C] every column of every linear
    cost = torch.cat([torch.full((shapes[n][1],), shapes[n][0], dtype=torch.long) for n in names])  # [C]
    order = torch.sort(s, descending=True, stable=True).indices  # [C] stable: ties keep index order
    taken = order[torch.cumsum(cost[order], 0) <= k]  # [C'] the longest prefix that fits the budget
    keep = torch.zeros(len(s), dtype=torch.bool)
    keep[taken] = True
    masks, start = {}, 0
    for n in names:
        rows, cols = shapes[n]
        masks[n] = keep[start : start + cols][None, :].expand(rows, cols).clone()  # [rows, cols]
        start += cols
    return masks


class MaskReport(NamedTuple):
    n_kept: int
    n_weights: int
    per_linear: dict[str, int]  # linear -> kept weights
    per_layer: dict[int, int]  # decoder layer index -> kept weights
    per_module: dict[str, int]  # q_proj, k_proj, ..., down_proj -> kept weights
    module_weights: dict[str, int]  # q_proj, ... -> all weights of that kind (for fractions)


def mask_report(masks: Mapping[str, torch.Tensor]) -> MaskReport:
    """Counts of kept weights per linear, per decoder layer and per module kind.

    Names are walk.named_linears' "model.layers.{i}.{self_attn|mlp}.{kind}".
    """
    per_linear, per_layer, per_module, module_weights = {}, {}, {}, {}
    for name, m in masks.items():
        kept = int(m.sum())
        per_linear[name] = kept
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer:
            i = int(layer.group(1))
            per_layer[i] = per_layer.get(i, 0) + kept
        kind = name.rsplit(".", 1)[-1]
        per_module[kind] = per_module.get(kind, 0) + kept
        module_weights[kind] = module_weights.get(kind, 0) + m.numel()
    return MaskReport(sum(per_linear.values()), sum(module_weights.values()), per_linear, per_layer,
                      per_module, module_weights)


