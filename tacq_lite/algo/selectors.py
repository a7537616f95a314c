"""Saliency scores: which weights deserve to stay in 16-bit (TaCQ and the baselines it beats).

Task-Circuit Quantization (Xiao et al., 2025, arXiv 2504.07389, Sec. 3.2, Eq. 4) scores a
weight by the first-order Taylor estimate of how much the loss changes when the weight moves
from W to its quantized value Q(W), times its magnitude:

    tacq = |W| · |G| · |Q(W) − W|,    G = Σ_samples |dL/dW|   (algo/gradients.py)

The paper's ablations and related methods give the other selectors:
  magnitude  |W|                         (keep the largest weights)
  gradient   |G|                         (saliency alone)
  qal        |G| · |Q(W) − W|            (quantization-aware localization, TaCQ without |W|)
  msg        |W| · |G|                   (magnitude × gradient, TaCQ without the error term)
  fisher     Σg² · (Q(W) − W)²           (SqueezeLLM, Kim et al. 2023: Fisher-weighted error)
  hessian    (W − Q(W))² / [H⁻¹]_jj      (SpQR, Dettmers et al. 2023: the OBS loss increase)
  activation |W| · ‖x_j‖, ‖x_j‖ ∝ √H_jj  (AWQ/OWQ flavour: big weights on big input channels)
  owq_columns whole input columns by OWQ's sensitivity H_jj · Σ_i (W − Q(W))²_ij
              (Lee et al. 2024), spread over the column's rows so that the budget buys the
              columns with the most sensitivity per kept weight (algo/select.py: select_columns)
  random     uniform in [0, 1), seeded (the floor any selector must beat)

Every selector is a pure tensor function with keyword-only inputs: W, G, QW [rows, cols],
G2 [rows, cols], H_diag, Hinv_diag [cols]; it returns a float32 score [rows, cols] >= 0.
`SELECTORS` declares what each one needs, so run/tacq.py computes only that: a selector
that needs no G skips the backward passes, one that needs no QW/H skips the first GPTQ pass.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

INPUTS = ("G", "G2", "QW", "H_diag", "Hinv_diag")  # what a selector may need besides W


def _err(W: torch.Tensor, QW: torch.Tensor) -> torch.Tensor:
    return QW.float() - W.float()  # [rows, cols] quantization error Q(W) − W


def tacq(*, W, G, QW):
    return W.float().abs() * G.float().abs() * _err(W, QW).abs()  # [rows, cols]


def magnitude(*, W):
    return W.float().abs()  # [rows, cols]


def gradient(*, W, G):
    return G.float().abs().expand_as(W)  # [rows, cols]


def qal(*, W, G, QW):
    return G.float().abs() * _err(W, QW).abs()  # [rows, cols]


def msg(*, W, G):
    return W.float().abs() * G.float().abs()  # [rows, cols]


def fisher(*, W, G2, QW):
    # SqueezeLLM's sensitivity: the Fisher diagonal (mean g², here the sum: same ranking) × error².
    return G2.float() * _err(W, QW).square()  # [rows, cols]


def hessian(*, W, QW, Hinv_diag):
    # OBS (Hassibi & Stork 1993) / SpQR: quantizing w_ij alone raises the layer loss by
    # (w − q)² / (2 [H⁻¹]_jj); the constant ½ does not change the ranking.
    return _err(W, QW).square() / Hinv_diag.float()[None, :]  # [rows, cols] / [1, cols]


def activation(*, W, H_diag):
    # H = 2/n Σ x xᵀ, so √H_jj is the RMS input of channel j up to a constant factor.
    return W.float().abs() * H_diag.float().clamp_min(0).sqrt()[None, :]  # [rows, cols]


def owq_column_sensitivity(*, W, QW, H_diag) -> torch.Tensor:
    """OWQ's per-column sensitivity λ_j ‖ΔW_:,j‖² with λ_j = H_jj; [cols]."""
    return H_diag.float() * _err(W, QW).square().sum(0)  # [cols]


def owq_columns(*, W, QW, H_diag):
    # A kept column costs `rows` weights of the budget, so rank columns by sensitivity per
    # kept weight; every weight of column j carries the column's value (a view, no copy).
    per_weight = owq_column_sensitivity(W=W, QW=QW, H_diag=H_diag) / W.shape[0]  # [cols]
    return per_weight[None, :].expand(W.shape)  # [rows, cols]


def random(*, W, generator: torch.Generator | None = None):
    return torch.rand(W.shape, generator=generator)  # [rows, cols] on the CPU, seeded by `generator`


class Selector(NamedTuple):
    fn: Callable[..., torch.Tensor]
    needs: frozenset[str]  # inputs besides W, from INPUTS
    columns: bool  # True: keeps whole input columns (algo/select.py: select_columns), else single weights
    source: str  # where the criterion comes from


SELECTORS: dict[str, Selector] = {
    "tacq": Selector(tacq, frozenset({"G", "QW"}), False, "TaCQ (Xiao et al., 2025), Eq. 4"),
    "magnitude": Selector(magnitude, frozenset(), False, "weight magnitude"),
    "gradient": Selector(gradient, frozenset({"G"}), False, "gradient saliency"),
    "qal": Selector(qal, frozenset({"G", "QW"}), False, "TaCQ ablation: no |W|"),
    "msg": Selector(msg, frozenset({"G"}), False, "TaCQ ablation: no |Q(W) − W|"),
    "fisher": Selector(fisher, frozenset({"G2", "QW"}), False, "SqueezeLLM (Kim et al., 2023)"),
    "hessian": Selector(hessian, frozenset({"QW", "Hinv_diag"}), False, "SpQR (Dettmers et al., 2023)"),
    "activation": Selector(activation, frozenset({"H_diag"}), False, "AWQ/OWQ activation outliers"),
    "owq_columns": Selector(owq_columns, frozenset({"QW", "H_diag"}), True, "OWQ (Lee et al., 2024)"),
    "random": Selector(random, frozenset(), False, "uniform random, seeded"),
}


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise ValueError(f"selector={name!r} is unknown; choose one of {', '.join(SELECTORS)}.")
    return SELECTORS[name]


def needs_gradients(name: str) -> bool:
    """True when the selector needs backward passes (G or Σg²)."""
    return bool(get_selector(name).needs & {"G", "G2"})


def score(
    selector: str,
    *,
    W: torch.Tensor,
    G: torch.Tensor | None = None,
    G2: torch.Tensor | None = None,
    QW: torch.Tensor | None = None,
    H_diag: torch.Tensor | None = None,
    Hinv_diag: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The selector's float32 score [rows, cols] for one linear; missing inputs -> ValueError."""
    sel = get_selector(selector)
    if W.dim() != 2:
        raise ValueError(f"W must be [rows, cols], got shape {tuple(W.shape)}.")
    given = {"G": G, "G2": G2, "QW": QW, "H_diag": H_diag, "Hinv_diag": Hinv_diag}
    missing = sorted(n for n in sel.needs if given[n] is None)
    if missing:
        raise ValueError(f"selector {selector!r} needs {', '.join(missing)}; pass them as keywords.")
    for name in sel.needs:
        want = W.shape if name in ("G", "G2", "QW") else W.shape[1:]
        if tuple(given[name].shape) != tuple(want):
            raise ValueError(f"{name} has shape {tuple(given[name].shape)}, expected {tuple(want)} for W {tuple(W.shape)}.")
    kwargs = {n: given[n] for n in sel.needs}
    if sel.fn is random:
        kwargs["generator"] = generator
    return sel.fn(W=W, **kwargs)
