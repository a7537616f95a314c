"""Checkers for the course exercises in the notebooks: they say *what* is wrong, not only that it is.

Each exercise cell in a notebook (tagged `exercise`) asks the learner to write one function; the
cell after it calls the checker. A checker runs the function on small inputs, compares with
tacq_lite's own implementation, and on a mismatch tests the usual mistakes one by one (wrong
shape, 2**bits levels instead of 2**bits - 1 steps, zero point not rounded, a sign error, ...)
so that the message names the mistake. Passing prints a one-line confirmation.

    check_rtn_params(fn)     notebook 01: fn(W, bits) -> (scale, zero), per row, asymmetric
    check_gptq_update(fn)    notebook 02: fn(W, U, i, q) -> W after quantizing column i
    check_tacq_score(fn)     notebook 03: fn(W, G, QW) -> TaCQ's score
    check_pack3(fn)          notebook 05: fn(codes) -> int32 words, 10 three-bit codes each
    check_dequant_groups(fn) notebook 05: fn(packed, scale, zero, *, bits, cols, groupsize) -> dense, Triton

`tacq-lite student` writes student copies of the notebooks with the solutions removed (course/student.py).
"""
from __future__ import annotations

import torch

from ..algo import selectors
from ..core import pack, quant


class ExerciseError(AssertionError):
    """The learner's function does not do what the exercise asks; the message says what differs."""


def _call(fn, name: str, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise ExerciseError(f"{name} is not written yet (it raises NotImplementedError): replace the "
                            "`raise NotImplementedError` line with your code.") from None
    except Exception as err:  # the learner's code crashed: show what it raised
        raise ExerciseError(f"{name} raised {type(err).__name__}: {err}") from err


def _tensor(value, name: str, shape: tuple, hint: str) -> torch.Tensor:
    if value is None:
        raise ExerciseError(f"{name} is None: the function must return it (did you forget `return`?).")
    if not isinstance(value, torch.Tensor):
        raise ExerciseError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if tuple(value.shape) != tuple(shape):
        raise ExerciseError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}: {hint}")
    return value


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


def _ok(message: str) -> None:
    print(f"✓ {message}")


# --------------------------------------------------------------------------- RTN (notebook 01)


def check_rtn_params(fn) -> None:
    """fn(W [rows, cols], bits) -> (scale [rows, 1], zero [rows, 1]) of asymmetric min/max RTN."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(6, 16, generator=gen)
    W[:, 0], W[:, 1] = -W.abs().max() - 0.5, W.abs().max() + 0.25  # every row straddles 0
    W[3] *= 3.0
    for bits in (3, 4):
        out = _call(fn, "your function", W.clone(), bits)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ExerciseError(f"return a pair (scale, zero); got {type(out).__name__}"
                                f"{'' if not isinstance(out, (tuple, list)) else f' of length {len(out)}'}.")
        hint = "one value per output row; reduce over dim=1 with keepdim=True."
        scale = _tensor(out[0], "scale", (6, 1), hint).double()
        zero = _tensor(out[1], "zero", (6, 1), hint).double()
        ref_s, ref_z = (t.double() for t in quant.find_params(W, bits=bits))  # per row, asymmetric, min/max
        lo = W.min(1, keepdim=True).values.double()
        hi = W.max(1, keepdim=True).values.double()
        maxq = 2**bits - 1
        if not _close(scale, ref_s):
            if _close(scale, (hi - lo) / 2**bits):
                raise ExerciseError(f"scale uses 2**bits = {2**bits} levels; a {bits}-bit grid has codes 0..{maxq}, "
                                    f"so (max − min) is split into 2**bits − 1 = {maxq} steps.")
            if _close(scale, (hi - lo) / (2**bits + 1)):
                raise ExerciseError(f"scale divides by 2**bits + 1 = {2**bits + 1}; it should be 2**bits − 1 = {maxq}.")
            if _close(scale, hi.abs().maximum(lo.abs()) / maxq) or _close(scale, 2 * hi.abs().maximum(lo.abs()) / maxq):
                raise ExerciseError("scale comes from max |w| (a symmetric grid); this exercise is asymmetric: "
                                    "scale = (max − min) / (2**bits − 1).")
            if _close(scale, (lo - hi) / maxq):
                raise ExerciseError("scale is negative: it is (max − min) / (2**bits − 1), not (min − max) / ...")
            raise ExerciseError(f"scale differs from (max − min) / (2**bits − 1) at bits={bits}: "
                                f"got {scale[:3, 0].tolist()}, expected {ref_s[:3, 0].tolist()} (first rows).")
        if not _close(zero, ref_z):
            if _close(zero, -lo / scale):
                raise ExerciseError("the zero point is not rounded: GPTQ-style grids store an integer zero, "
                                    "zero = round(−min / scale).")
            if _close(zero, torch.round(lo / scale)) or _close(zero, lo / scale):
                raise ExerciseError("zero has the wrong sign: the smallest weight must map to code 0, so "
                                    "zero = round(−min / scale) (a positive number here).")
            if _close(zero, torch.round(-hi / scale)) or _close(zero, torch.round(hi / scale)):
                raise ExerciseError("zero is computed from the maximum; it comes from the minimum: round(−min / scale).")
            raise ExerciseError(f"zero differs from round(−min / scale) at bits={bits}: got {zero[:3, 0].tolist()}, "
                                f"expected {ref_z[:3, 0].tolist()}.")
    _ok("RTN scale and zero match tacq_lite.core.quant.find_params at 3 and 4 bits.")


# --------------------------------------------------------------------------- GPTQ (notebook 02)


def _obs_step(W: torch.Tensor, H: torch.Tensor, j: int, q: torch.Tensor) -> torch.Tensor:
    """The optimal-brain-surgeon step from H itself: with F = columns j.. still free and
    Finv = (H_FF)⁻¹, fixing w_j to q moves the free columns by −(w_j − q) · Finv[0, 1:] / Finv[0, 0]
    (Frantar et al. 2022, eq. 3). GPTQ reads the same ratio off a row of the Cholesky factor of
    H⁻¹; deriving it here from H checks the learner's Cholesky form against independent math."""
    Finv = torch.linalg.inv(H[j:, j:])  # [cols − j, cols − j]
    out = W.clone()
    out[:, j + 1:] -= ((W[:, j] - q) / Finv[0, 0])[:, None] * Finv[0, 1:][None, :]
    out[:, j] = q
    return out


def _gptq_case(seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = 5, 8
    X = torch.randn(64, cols, generator=gen, dtype=torch.float64)
    H = 2 * X.T @ X / 64 + 0.01 * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return W, H, Hinv


def check_gptq_update(fn) -> None:
    """fn(W [rows, cols], U [cols, cols] upper Cholesky factor of H⁻¹, i, q [rows]) -> new W [rows, cols].

    Messages use notebook 02's names: the factor is `U`, the column being quantized is `i`."""
    W, H, U = _gptq_case()
    for i in (0, 3):
        q = torch.round(W[:, i] * 2) / 2  # a coarse grid
        out = _call(fn, "your function", W.clone(), U.clone(), i, q.clone())
        got = _tensor(out, "the returned W", tuple(W.shape), "return the whole updated matrix.").double()
        ref = _obs_step(W, H, i, q)
        if _close(got, ref, 1e-8):
            continue
        err = (W[:, i] - q) / U[i, i]
        if _close(got, W, 1e-12):
            raise ExerciseError("W came back unchanged: set column i to q and update the columns after it.")
        if not _close(got[:, i], q, 1e-8):
            raise ExerciseError(f"column i={i} should hold the quantized values q after the update.")
        if not _close(got[:, :i], W[:, :i], 1e-8):
            raise ExerciseError(f"columns before i={i} changed: they are already quantized and must stay as they are.")
        plus = W.clone()
        plus[:, i] = q
        plus[:, i + 1:] += err[:, None] * U[i, i + 1:][None, :]
        if _close(got, plus, 1e-8):
            raise ExerciseError("sign error: the later columns must move by −err · U[i, i+1:], "
                                "compensating the error, not doubling it.")
        raw = W.clone()
        raw[:, i] = q
        raw[:, i + 1:] -= (W[:, i] - q)[:, None] * U[i, i + 1:][None, :]
        if _close(got, raw, 1e-8):
            raise ExerciseError("the error is not divided by U[i, i]: err = (w − q) / U[i, i] before it is "
                                "multiplied by the row U[i, i+1:].")
        sq = W.clone()
        sq[:, i] = q
        sq[:, i + 1:] -= ((W[:, i] - q) / U[i, i] ** 2)[:, None] * U[i, i + 1:][None, :]
        if _close(got, sq, 1e-8):
            raise ExerciseError("the error is divided by U[i, i]²; with the Cholesky factor it is divided once.")
        col = W.clone()
        col[:, i] = q
        col[:, i + 1:] -= err[:, None] * U[i + 1:, i][None, :]
        if _close(got, col, 1e-8):
            raise ExerciseError("the update uses the column U[i+1:, i]; with the upper Cholesky factor it is the "
                                "row U[i, i+1:] (the column below the diagonal is zero).")
        raise ExerciseError(f"the update at i={i} differs from W[:, i+1:] −= err ⊗ U[i, i+1:] with "
                            f"err = (w − q) / U[i, i]; largest difference {float((got - ref).abs().max()):.3g}.")
    _ok("the GPTQ column update matches the optimal-brain-surgeon step used by tacq_lite.algo.gptq.")


# --------------------------------------------------------------------------- TaCQ score (notebook 03)


def check_tacq_score(fn) -> None:
    """fn(W, G, QW) -> |W| · |G| · |Q(W) − W|, same shape as W."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(4, 6, generator=gen)
    G = torch.randn(4, 6, generator=gen).abs() + 0.1  # accumulated |grad|: non-negative
    QW = W + 0.1 * torch.randn(4, 6, generator=gen)
    out = _call(fn, "your function", W.clone(), G.clone(), QW.clone())
    got = _tensor(out, "the score", tuple(W.shape), "one score per weight, no reduction.")
    ref = selectors.score("tacq", W=W, G=G, QW=QW)
    if _close(got, ref):
        _ok("the TaCQ score |W| · |G| · |Q(W) − W| matches tacq_lite.algo.selectors.")
        return
    if (got < 0).any():
        raise ExerciseError("some scores are negative: take absolute values, |W| and |Q(W) − W| "
                            "(a weight's importance does not depend on its sign).")
    cases = [
        (G * (QW - W).abs(), "the |W| factor is missing: that is the `qal` score; TaCQ multiplies it by |W| "
                             "(magnitude sharpening)."),
        (W.abs() * G, "the quantization factor |Q(W) − W| is missing: that is the `msg` score; TaCQ also weighs "
                      "by how far quantization moves the weight."),
        (G * (QW - W).abs() ** 2 * W.abs(), "|Q(W) − W| is squared; TaCQ's first-order estimate uses it once."),
        (W.abs() * G * QW.abs(), "the last factor should be |Q(W) − W| (how much quantization changes the "
                                 "weight), not |Q(W)|."),
        (W.abs() * G ** 2 * (QW - W).abs(), "G is squared (a Fisher-style score); TaCQ uses |G| once."),
    ]
    for value, message in cases:
        if _close(got, value):
            raise ExerciseError(message)
    raise ExerciseError(f"the score differs from |W| · |G| · |Q(W) − W|; largest difference "
                        f"{float((got - ref).abs().max()):.3g}.")


# --------------------------------------------------------------------------- 3-bit packing (notebook 05)


def check_pack3(fn) -> None:
    """fn(codes uint8 [rows, cols]) -> int32 [rows, ceil(cols / 10)], code k at bits 3·(k % 10) of word k // 10."""
    gen = torch.Generator().manual_seed(4)
    for cols in (20, 23):  # one multiple of 10, one that needs a padded last word
        codes = torch.randint(0, 8, (3, cols), generator=gen, dtype=torch.uint8)
        out = _call(fn, "your function", codes.clone())
        words = -(-cols // 10)
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == cols // 10 and cols % 10:
            raise ExerciseError(f"{cols} columns need {words} words: round the word count up (ceil(cols / 10)) and "
                                "pad the last word with zero codes.")
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == -(-cols // 8) != words:
            raise ExerciseError("8 codes per word is the 4-bit layout; 3-bit codes go 10 to a word (30 of 32 bits).")
        got = _tensor(out, "the packed words", (3, words), f"[rows, ceil(cols / 10)] = [3, {words}].")
        if got.dtype != torch.int32:
            raise ExerciseError(f"the words must be int32 (the kernels load 32-bit words), got {got.dtype}.")
        ref = pack.pack(codes, bits=3)
        if torch.equal(got, ref):
            continue
        padded = torch.zeros(3, words * 10, dtype=torch.int64)
        padded[:, :cols] = codes.long()
        rev = (padded.reshape(3, words, 10) << (3 * torch.arange(9, -1, -1))).sum(-1)
        rev = torch.where(rev >= 2**31, rev - 2**32, rev).to(torch.int32)
        if torch.equal(got, rev):
            raise ExerciseError("the codes are in reverse order inside each word: code k goes to bits 3·(k % 10) "
                                "(the first code in the lowest bits).")
        if torch.equal(got & 0x3FFFFFFF, ref & 0x3FFFFFFF):
            raise ExerciseError("bits 30-31 of some words are not zero: only 10 codes (30 bits) go in a word.")
        raise ExerciseError(f"the packed words differ from tacq_lite.core.pack.pack at cols={cols}: got "
                            f"{got[0].tolist()}, expected {ref[0].tolist()} (first row).")
    _ok("3-bit packing matches tacq_lite.core.pack.pack, including a padded last word.")


# --------------------------------------------------------------------------- group dequant kernel (notebook 05)


def _not_written(err: BaseException) -> bool:
    """True when err, or what caused it (Triton's interpreter wraps kernel errors), is the exercise stub."""
    while err is not None:
        if isinstance(err, NotImplementedError) or "exercise: write this part" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _dequant_groups_mistakes(codes, scale, zero, groupsize):
    """What the usual mistakes of the group-dequant exercise compute, in float64: [(value, message)]."""
    rows, cols = codes.shape
    Q, S, Z = codes.double(), scale.double(), zero.double()  # [rows, cols], [rows, n_groups] x2
    r, c = torch.arange(rows), torch.arange(cols)
    g = c // groupsize  # [cols] the right group of each column
    Sf, Zf = S.flatten(), Z.flatten()  # what the kernel sees: row-major memory

    def grid(s, z):
        return s * (Q - z)

    return [
        (grid(S[r, r // groupsize][:, None], Z[r, r // groupsize][:, None]),
         "`g` comes from the row (r // groupsize); groups run along the columns: g = c // groupsize."),
        (grid(Sf[r][:, None], Zf[r][:, None]),
         "scale and zero are read at `scale_ptr + r`, as in `dequant_rows`; with groups they are [rows, n_groups] "
         "in row-major order, so element (r, g) sits at offset r * n_groups + g."),
        (grid(S[0, g][None, :], Z[0, g][None, :]),
         "the row offset is missing: every row reads row 0's scale and zero; the offset is r * n_groups + g."),
        (grid(Sf[g[None, :] * rows + r[:, None]], Zf[g[None, :] * rows + r[:, None]]),
         "scale and zero are indexed as if they were [n_groups, rows] (g * rows + r); they are [rows, n_groups]: "
         "r * n_groups + g."),
        (grid(S[:, c // (groupsize + 1)], Z[:, c // (groupsize + 1)]),
         "the group index divides by groupsize + 1: columns 0 .. groupsize − 1 form group 0, so g = c // groupsize."),
        (S[:, g] * Q, "the zero is not subtracted: w = s · (q − z)."),
        (S[:, g] * Q - Z[:, g], "the zero is subtracted after scaling (s · q − z); subtract it from the code first: "
                                "w = s · (q − z)."),
        (Q - Z[:, g], "the scale is missing: w = s · (q − z)."),
    ]


def check_dequant_groups(fn) -> None:
    """fn(packed, scale, zero, *, bits, cols, groupsize) -> float32 [rows, cols], column c using group c // groupsize.

    fn launches the learner's Triton kernel (through TRITON_INTERPRET=1 on a CPU); scale and zero are fp16
    [rows, cols // groupsize]. Shapes are odd on purpose: rows and cols are not multiples of the tile.
    """
    gen = torch.Generator().manual_seed(5)
    for bits, rows, cols, groupsize in ((3, 19, 72, 24), (2, 5, 40, 8), (4, 6, 36, 12)):
        W = torch.randn(rows, cols, generator=gen)
        scale, zero = quant.find_params(W, bits=bits, groupsize=groupsize)  # [rows, n_groups] each
        codes = quant.quantize(W, scale, zero, bits=bits)  # uint8 [rows, cols]
        packed = pack.pack(codes, bits=bits)  # int32 [rows, words]
        s16, z16 = scale.half(), zero.half()
        where = f"at bits={bits}, rows={rows}, cols={cols}, groupsize={groupsize}"
        try:
            out = fn(packed.clone(), s16.clone(), z16.clone(), bits=bits, cols=cols, groupsize=groupsize)
        except Exception as err:  # the interpreter wraps what the kernel raised
            if _not_written(err):
                raise ExerciseError("dequant_groups is not written yet (it raises NotImplementedError): replace the "
                                    "`raise NotImplementedError` line with your code.") from None
            hint = (" In the kernel, s and z are now [BLOCK_R, BLOCK_C] (one per element): load them with the 2-D "
                    "mask `ok` and use them as they are, without [:, None]."
                    if "broadcast" in str(err).lower() or "shape" in str(err).lower() else "")
            raise ExerciseError(f"your launcher raised {type(err).__name__} {where}: {err}.{hint}") from err
        got = _tensor(out, "the dequantized matrix", (rows, cols), "one value per weight, [rows, cols].")
        if not got.is_floating_point():
            raise ExerciseError(f"the output must be floating point, got {got.dtype}.")
        from ..kernels.dequant import dequantize_packed_ref  # here: it imports triton (after TRITON_INTERPRET is set)

        ref = dequantize_packed_ref(packed, s16, z16, bits=bits, cols=cols, groupsize=groupsize, dtype=torch.float32)
        if _close(got, ref):
            continue
        if not torch.isfinite(got).all():
            raise ExerciseError(f"some outputs are NaN or inf {where}: an entry was not written, or a load read past "
                                "the grid; every load and the store need the mask `ok`.")
        for value, message in _dequant_groups_mistakes(codes, s16, z16, groupsize):
            if _close(got, value):
                raise ExerciseError(f"{message} (seen {where})")
        bad = ~torch.isclose(got.double(), ref.double(), rtol=1e-5, atol=1e-5)  # [rows, cols]
        raise ExerciseError(f"the output differs from tacq_lite's dequantize_packed_ref {where} at {int(bad.sum())} "
                            f"of {bad.numel()} weights, first at (row, col) = {tuple(bad.nonzero()[0].tolist())}.")
    _ok("dequant_groups matches tacq_lite's dequantize_packed_ref at 2, 3 and 4 bits on odd shapes.")


CHECKERS = {"rtn_params": check_rtn_params, "gptq_update": check_gptq_update, "tacq_score": check_tacq_score,
            "pack3": check_pack3, "dequant_groups": check_dequant_groups}

__all__ = ["CHECKERS", "ExerciseError", "check_dequant_groups", "check_gptq_update", "check_pack3", "check_rtn_params",
           "check_tacq_score"]
