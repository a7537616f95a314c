"""GPTQ: one-shot weight quantization with second-order error compensation, plus TaCQ's mask.

GPTQ (Frantar et al., 2022, arXiv 2210.17323) quantizes a linear layer column by column and
pushes each column's rounding error onto the columns not yet quantized, so that the layer
output x Wᵀ changes as little as possible. The objective is ‖x Wᵀ − x Ŵᵀ‖² with the Hessian
H = 2/n Σ x xᵀ; the update uses the upper Cholesky factor of H⁻¹ (Alg. 1) and is applied
lazily, one block of `blocksize` columns at a time (Sec. 3, "lazy batch-updates").

Task-Circuit Quantization (TaCQ, Xiao et al., 2025, arXiv 2504.07389, Sec. 3.3) keeps a few
salient weights in 16-bit. `mask` [rows, cols] marks them (True = keep). Here a kept weight
  * is left out of the scale/zero fit: it is replaced by its row-group's mean of the other
    weights first (quant.fill_masked), so an outlier cannot stretch the grid;
  * emits no error: its column's error is 0 in that row, so nothing is pushed forward from it;
  * is stored as `keep_value` says:
      "compensated" (default): the working value it holds when its column comes up, i.e. its
        original value plus every update earlier columns' errors pushed onto it;
      "original": its original value, bit for bit (those pushed updates are discarded).

The default is the authors' masked GPTQ (The-Inscrutable-X/TACQ at cfc4ccc, gptq/gptq.py):
the column is read after compensation (l. 207, `w = W1[:, i]`), its kept entries are added back
to the quantized column (l. 269 `w_preserved = w*self.important_mask[:, i1 + i]`, l. 285
`q = q + w_preserved`, l. 290 `Q1[:, i] = q`), so their error `(w - q) / d` (l. 293) is 0; the
fill before the grid fit is l. 116-125 (per channel) and l. 220-231 (groups). (With act-order their
loop reads the mask unpermuted, `important_mask[:, i1 + i]` on a permuted W, l. 150 and 269; here the
mask is permuted with W. Act-order is off in their scripts and by default here.) "original" throws
the pushed updates away, an error that GPTQ's own `loss` never counts: notebook 02 and
BENCHMARKS.md measure what that costs.

Dead input columns (H[i, i] == 0: the input is always 0 there) get H[i, i] = 1. Their
row and column of H are zero, so they are decoupled: they are rounded to nearest, emit
no error and add nothing to `loss`; a kept weight in such a column stores its original value
under either keep_value. The reference code (and the authors', gptq/gptq.py l. 135) zeroes such
weights instead; rounding keeps them useful on inputs the calibration set never switched on, and
an all-zero Hessian then gives plain round-to-nearest.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..core import quant

CHOLESKY_TRIES = 5  # each retry multiplies the damping by 10
HESSIAN_BLOCK = 192  # columns per row block of Σ x xᵀ (only blocks on or above the diagonal are computed)
KEEP_VALUES = ("compensated", "original")  # what a kept weight is stored as; see the module docstring


def check_keep_value(keep_value: str) -> str:
    """keep_value itself, or a ValueError naming the two choices."""
    if keep_value not in KEEP_VALUES:
        raise ValueError(f"keep_value={keep_value!r} is unknown; choose 'compensated' (the authors' masked GPTQ) "
                         "or 'original'.")
    return keep_value


class GPTQResult(NamedTuple):
    W_hat: torch.Tensor  # [rows, cols] float32, dequantized; at mask positions the kept value (see keep_value)
    codes: torch.Tensor  # [rows, cols] uint8; at mask positions: the grid's code of the working value, unused
    scale: torch.Tensor  # [rows, n_groups] float32
    zero: torch.Tensor  # [rows, n_groups] float32 holding integers
    loss: float  # Σ (w − q)² / (2 d²) over quantized entries: GPTQ's estimate of the layer error
    Hinv_diag: torch.Tensor  # [cols] float32, diag of (H + damp·I)⁻¹ in the original column order
    damp: float  # damping actually added to diag(H)


def inverse_hessian(H: torch.Tensor, *, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor U of the damped inverse, (H + damp·I)⁻¹ = Uᵀ U: (U, diag of the inverse, damp).

    damp = percdamp · mean(diag H) (GPTQ Sec. 3, "Cholesky reformulation"). A Hessian from
    few samples can still be numerically indefinite, so a failed factorization is retried
    with 10× the damping, up to CHOLESKY_TRIES times.

    U comes without forming the inverse. With J the reversal of rows and columns and
    J (H + damp·I) J = L Lᵀ (lower Cholesky), (H + damp·I)⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J
    is upper triangular with a positive diagonal: it is the factor. One Cholesky and one
    triangular inverse, where inverting and factoring again costs about three times as much.
    """
    if percdamp <= 0:
        raise ValueError(f"percdamp={percdamp!r} must be > 0 (GPTQ uses 0.01).")
    cols = H.shape[0]
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)  # [cols, cols]
    damp = percdamp * torch.diag(H).mean().item()
    flipped = H.flip(0, 1)  # [cols, cols] J H J
    for _ in range(CHOLESKY_TRIES):
        L, info = torch.linalg.cholesky_ex(flipped + damp * eye)  # [cols, cols] lower
        if info.item() == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)  # [cols, cols] upper
            if torch.isfinite(U).all():
                return U, U.square().sum(0), damp  # diag(Uᵀ U)_j = Σ_i U[i, j]²
        damp *= 10
    raise RuntimeError(
        f"Cholesky of the damped Hessian failed {CHOLESKY_TRIES} times (last damp={damp / 10:.3g}). "
        "The calibration inputs are probably non-finite or far too few; check them, add samples, "
        "or raise percdamp."
    )


class GPTQ:
    """Per-layer GPTQ state: the weight W [rows, cols] and the Hessian H [cols, cols]."""

    def __init__(self, layer: torch.nn.Module | torch.Tensor):
        weight = layer if isinstance(layer, torch.Tensor) else getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"GPTQ needs a weight tensor or a layer with .weight, got {type(layer).__name__}.")
        quant.check_weight(weight, "weight")
        self.weight = weight  # read (never written) by quantize
        self.rows, self.cols = weight.shape
        self._H = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=weight.device)  # [cols, cols]
        self._stale_lower = False  # add_batch writes only the upper block triangle; `H` mirrors it
        self.nsamples = 0
        blocks = max(1, round(self.cols / HESSIAN_BLOCK))
        self._bounds = [self.cols * b // blocks for b in range(blocks + 1)]  # row blocks of H

    @property
    def H(self) -> torch.Tensor:
        """[cols, cols] the Hessian 2/n Σ x xᵀ, exactly symmetric."""
        if self._stale_lower:
            self._H.copy_(torch.triu(self._H) + torch.triu(self._H, 1).T)
            self._stale_lower = False
        return self._H

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._H, self._stale_lower = value, False

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate H = 2/n Σ x xᵀ over the layer inputs x [..., cols], as a running mean.

        n counts rows of x (tokens); the reference counts sequences. The two differ by a constant
        factor, which changes nothing: the damping is relative to mean(diag H).
        """
        if x.shape[-1] != self.cols:
            raise ValueError(
                f"x has last dimension {x.shape[-1]} but the layer has {self.cols} input columns; "
                "pass the layer's input, not its output."
            )
        x = x.detach().reshape(-1, self.cols).to(self._H.device, torch.float32)  # [n, cols]
        # A NaN or Inf anywhere makes the sum non-finite: one pass over x, where isfinite(x).all() takes two.
        if not math.isfinite(x.sum().item()):
            raise ValueError("x holds NaN/Inf (or absurdly large) values; the calibration forward pass is broken.")
        n = x.shape[0]
        if n == 0:
            return
        # Rescale the old mean so every sample ends with weight 2/n_total (reference GPTQ). addmm_
        # does the rescale, the product and the sum in place. H is symmetric, so only the row
        # blocks' parts on and right of the diagonal are computed (H[a:b, a:] += x[:, a:b]ᵀ x[:, a:]):
        # 36 of 64 blocks for 1536 columns, a third less time on CPU. `H` mirrors the rest when read.
        old, self.nsamples = self.nsamples, self.nsamples + n
        beta, alpha = old / self.nsamples, 2 / self.nsamples
        for a, b in zip(self._bounds[:-1], self._bounds[1:]):
            self._H[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], beta=beta, alpha=alpha)  # [b − a, cols − a]
        self._stale_lower = len(self._bounds) > 2

    def copy_stats_from(self, other: GPTQ) -> None:
        """Take other's Hessian: for a linear that reads the same inputs (q/k/v, gate/up).

        Saves computing the same Σ x xᵀ once per linear; the true-sequential pass uses it.
        """
        if other.cols != self.cols:
            raise ValueError(f"other has {other.cols} input columns, this layer {self.cols}.")
        self.H = other.H.clone()
        self.nsamples = other.nsamples

    def quantize(
        self,
        *,
        bits: int,
        groupsize: int = -1,
        sym: bool = False,
        mse: bool = True,
        blocksize: int = 128,
        percdamp: float = 0.01,
        actorder: bool = False,
        mask: torch.Tensor | None = None,
        keep_value: str = "compensated",
    ) -> GPTQResult:
        """Quantize W with GPTQ; the layer is not modified. See the module docstring for `mask`
        and `keep_value` (which only matters when a mask is given)."""
        quant.check_bits(bits)
        check_keep_value(keep_value)
        if not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"blocksize={blocksize!r} must be a positive int (GPTQ uses 128).")
        if self.nsamples == 0:
            raise RuntimeError("No calibration data: call add_batch(x) with the layer's inputs before quantize().")
        W0 = self.weight.detach().to(torch.float32)  # [rows, cols] original, never written
        rows, cols = W0.shape
        gs = quant.check_groupsize(groupsize, cols)
        grouped = gs < cols
        quant.check_mask(mask, W0)

        H = self.H.clone()  # [cols, cols]
        dead = torch.diag(H) == 0  # [cols]
        H[dead, dead] = 1  # decouples dead columns: their off-diagonal entries are 0
        free = torch.ones_like(W0, dtype=torch.bool) if mask is None else ~mask  # [rows, cols] quantized entries
        free = free & ~dead  # dead columns cannot change the output: no error to compensate

        perm = torch.arange(cols, device=W0.device)
        if actorder:  # GPTQ's "act-order": quantize the columns with large inputs first
            perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
        Hinv_chol, Hinv_diag, damp = inverse_hessian(H, percdamp=percdamp)

        n_groups = cols // gs
        maxq = 2**bits - 1
        if not grouped or actorder:
            # Per channel, or act-order with groups: fit every group once on the original W
            # ("static groups"), so a group's grid does not depend on the column order.
            scale, zero = quant.find_params(W0, bits=bits, sym=sym, groupsize=groupsize, mse=mse, mask=mask)
        else:
            # Groups in order: fit each group when its first column comes up, on the current
            # (error-updated) weights, as GPTQ does.
            scale = torch.zeros(rows, n_groups, device=W0.device)  # [rows, n_groups]
            zero = torch.zeros(rows, n_groups, device=W0.device)
        group_of = perm // gs  # [cols] group of each permuted column, in original numbering

        # The loop works on Wt = Wᵀ: a column of W is then a contiguous row, and the rank-1
        # updates run many times faster on CPU than on strided column slices.
        Wt = W0[:, perm].T.contiguous()  # [cols, rows] working copy, permuted
        free_t = free[:, perm].T.contiguous()  # [cols, rows]
        compensated = mask is not None and keep_value == "compensated"
        keep_t = mask[:, perm].T.contiguous() if compensated else None  # [cols, rows] kept entries
        Qt = torch.zeros_like(Wt)  # [cols, rows] dequantized
        codes_t = torch.zeros(cols, rows, dtype=torch.uint8, device=W0.device)  # [cols, rows]
        loss = torch.zeros(rows, device=W0.device, dtype=torch.float64)  # [rows]
        group_of = group_of.tolist()
        if not grouped:
            s, z = scale[:, 0], zero[:, 0]  # [rows] one grid per row for every column
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = Wt[i1:i2].clone()  # [b, rows] current values of the block
            Err1 = torch.zeros_like(W1)  # [b, rows] scaled errors (w − q) / d
            Hinv1 = Hinv_chol[i1:i2, i1:i2]  # [b, b]
            d1 = torch.diag(Hinv1).tolist()  # Python floats: indexing a tensor per column costs more
            free1 = free_t[i1:i2]  # [b, rows]
            block_free = bool(free1.all())  # no kept or dead entry: skip the per-column select
            keep1 = keep_t[i1:i2] if compensated and keep_t[i1:i2].any() else None  # [b, rows] or None
            # This loop runs once per column; each torch call costs microseconds of overhead, so
            # quant.quantize/dequantize are inlined, work is done in place, and the loss is
            # summed per block.
            for i in range(i2 - i1):
                j = i1 + i  # permuted column index
                if grouped:
                    g = group_of[j]
                    if not actorder and j % gs == 0:
                        cur = W1[i : i + gs]  # [<=gs, rows] the in-block part is up to date
                        if j + gs > i2:  # the group runs past the block: apply this block's pending updates
                            rest = Wt[i2 : j + gs] - Hinv_chol[i1:j, i2 : j + gs].T @ Err1[:i]  # [j+gs-i2, rows]
                            cur = torch.cat([cur, rest])  # [gs, rows]
                        m = None if mask is None else mask[:, j : j + gs]
                        fit_s, fit_z = quant.find_params(cur.T, bits=bits, sym=sym, mse=mse, mask=m)  # [rows, 1]
                        scale[:, g : g + 1], zero[:, g : g + 1] = fit_s, fit_z
                    s, z = scale[:, g], zero[:, g]  # [rows]
                w = W1[i]  # [rows]
                c = torch.div(w, s).add_(z).round_().clamp_(0, maxq)  # [rows] integer codes
                q = torch.sub(c, z).mul_(s)  # [rows] s·(c − z)
                if keep1 is not None:  # kept entries hold their working value: w − q = 0 there
                    q = torch.where(keep1[i], w, q)
                codes_t[j], Qt[j] = c, q  # assignment casts the codes to uint8
                err = torch.sub(w, q).div_(d1[i])  # [rows], d = Hinv1[i, i]
                if not block_free:
                    err = torch.where(free1[i], err, 0.0)  # kept/dead entries send no error
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # [b − i, rows] compensate inside the block
                Err1[i] = err
            loss += Err1.double().square().sum(0) / 2  # OBS cost of each column: (w − q)² / (2 d²)
            Wt[i2:] -= Hinv_chol[i1:i2, i2:].T @ Err1  # [cols − i2, rows] lazy update of the rest

        inv = torch.argsort(perm)  # undo act-order
        W_hat = Qt[inv].T.contiguous()  # [rows, cols]
        if mask is not None and keep_value == "original":
            W_hat = torch.where(mask, W0, W_hat)  # kept weights: the original value, bit for bit
        codes = codes_t[inv].T.contiguous()  # [rows, cols]
        Hinv_diag = Hinv_diag[inv].to(torch.float32)  # [cols]
        return GPTQResult(W_hat, codes, scale, zero, loss.sum().item(), Hinv_diag, damp)


def reconstruction_error(x: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """‖x Wᵀ − x Ŵᵀ‖²_F / n for x [n, cols] (any leading dims), in float64.

    With H = 2/n Σ x xᵀ this equals ½ tr(ΔW H ΔWᵀ), the quantity GPTQ's `loss` tracks.
    """
    if W.shape != W_hat.shape or x.shape[-1] != W.shape[1]:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, W {tuple(W.shape)}, W_hat {tuple(W_hat.shape)}.")
    x = x.reshape(-1, W.shape[1]).double()  # [n, cols]
    diff = x @ (W.double() - W_hat.double()).T  # [n, rows]
    return diff.square().sum().item() / x.shape[0]
