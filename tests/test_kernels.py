"""Triton kernels vs their torch references (under TRITON_INTERPRET=1, set in conftest.py),
and the references vs plain dense math from quant.dequantize + mask."""
import pytest
import torch

from tacq_lite.core import pack as P
from tacq_lite.core import quant
from tacq_lite.kernels import choose_backend, dequant_matmul, dequant_weight, tuning
from tacq_lite.kernels.dequant import dequantize_packed, dequantize_packed_ref
from tacq_lite.kernels.gemv import gemv, gemv_configs, gemv_ref

try:
    import triton  # noqa: F401

    TRITON_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the install
    TRITON_ERROR = e
needs_triton = pytest.mark.skipif(TRITON_ERROR is not None, reason=f"triton import failed: {TRITON_ERROR}")

SHAPES = {-1: (72, 136), 64: (72, 192)}  # (rows, cols) not multiples of the kernels' blocks


def make_layer(*, bits, groupsize, kept_frac, rows=None, cols=None, seed=0):
    """A quantized layer: W, mask, codes, scale, zero, packed, kept (CSR or None)."""
    rows, cols = (rows, cols) if rows else SHAPES[groupsize]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)  # [rows, cols]
    mask = torch.rand(rows, cols, generator=g) < kept_frac  # [rows, cols]
    if kept_frac:
        mask[5] = True  # one row with more kept entries than a CSR block (BLOCK_NNZ = 32)
        mask[17:40] = False  # whole row blocks without kept weights
    scale, zero = quant.find_params(W, bits=bits, groupsize=groupsize, mask=mask)
    codes = quant.quantize(W, scale, zero, bits=bits)  # uint8 [rows, cols]
    kept = P.pack_sparse(W, mask) if kept_frac else None
    return W, mask, codes, scale, zero, P.pack(codes, bits=bits), kept


def dense_final(W, mask, codes, scale, zero):
    """W_final = where(mask, fp16 kept weight, W_hat), float64, from quant.dequantize."""
    W_hat = quant.dequantize(codes, scale, zero).double()
    return torch.where(mask, W.half().double(), W_hat)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groupsize", [-1, 64])
@pytest.mark.parametrize("kept_frac", [0.0, 0.035])
def test_references_match_dense_math(bits, groupsize, kept_frac):
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=bits, groupsize=groupsize, kept_frac=kept_frac)
    rows, cols = W.shape
    W_ref = dequantize_packed_ref(packed, scale, zero, kept, bits=bits, cols=cols, groupsize=groupsize, dtype=torch.float32)
    assert torch.equal(W_ref.double(), dense_final(W, mask, codes, scale, zero))
    x = torch.randn(5, cols)
    y = gemv_ref(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize)  # [5, rows]
    torch.testing.assert_close(y.double(), x.double() @ dense_final(W, mask, codes, scale, zero).T, rtol=1e-5, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groupsize", [-1, 64])
def test_dequant_kernel_matches_reference(bits, groupsize):
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=bits, groupsize=groupsize, kept_frac=0.035)
    cols = W.shape[1]
    for k, dtype in [(None, torch.float32), (kept, torch.float32), (kept, torch.float16)]:
        args = (packed, scale, zero, k)
        out = dequantize_packed(*args, bits=bits, cols=cols, groupsize=groupsize, dtype=dtype)
        ref = dequantize_packed_ref(*args, bits=bits, cols=cols, groupsize=groupsize, dtype=dtype)
        assert out.dtype == dtype and torch.equal(out, ref)  # same fp32 ops -> bitwise equal


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kept_scatter_kernel_writes_every_kept_weight(dtype):
    """The Triton scatter: rows with more kept entries than a tile, rows with none, int32 col_idx."""
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=3, groupsize=64, kept_frac=0.05, rows=70, cols=192)
    kw = dict(bits=3, cols=192, groupsize=64, dtype=dtype)
    dense_only = dequantize_packed_ref(packed, scale, zero, None, **kw)
    for k in (kept, kept._replace(col_idx=kept.col_idx.int())):
        out = dequantize_packed(packed, scale, zero, k, **kw)
        ref = dequantize_packed_ref(packed, scale, zero, k, **kw)
        if dtype == torch.bfloat16:  # the interpreter truncates to bf16 where torch (and a GPU) rounds to nearest
            torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)
        else:
            assert torch.equal(out, ref)
        moved = mask & (ref != dense_only)  # kept weights whose value is not the decoded code's
        assert moved.sum() > 0.5 * mask.sum()
        torch.testing.assert_close(out[moved], ref[moved], rtol=2**-7, atol=0)  # written, not left decoded


@needs_triton
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groupsize", [-1, 64])
@pytest.mark.parametrize("kept_frac", [0.0, 0.035])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_gemv_kernel_matches_reference(bits, groupsize, kept_frac, M):
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=bits, groupsize=groupsize, kept_frac=kept_frac, seed=M)
    x = torch.randn(M, W.shape[1])  # [M, cols]
    y = gemv(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize)  # [M, rows]
    assert y.shape == (M, W.shape[0]) and y.dtype == x.dtype
    torch.testing.assert_close(y, gemv_ref(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize), rtol=1e-5, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("bits, M", [(2, 1), (3, 1), (4, 1), (8, 1), (3, 5), (8, 5)])  # M > 1: the tl.dot path
@pytest.mark.parametrize("groupsize", [-1, 64])
def test_every_gemv_configuration_is_right(bits, groupsize, M):
    """Each configuration the tuner may pick (warps aside: the interpreter ignores them), on a shape
    where split-K really splits: per channel, 700 columns are 2-6 segments of 32 words; at group 64,
    640 columns are 10 groups (a 3-bit group straddles words). Row 5 has more kept entries than a
    CSR tile, rows 17-23 none."""
    rows, cols = 24, 700 if groupsize == -1 else 640
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=bits, groupsize=groupsize, kept_frac=0.01,
                                                           rows=rows, cols=cols, seed=bits + M)
    x = torch.randn(M, cols)  # [M, cols]
    ref = x.double() @ dense_final(W, mask, codes, scale, zero).T  # [M, rows]
    configs = gemv_configs(rows, cols, bits, groupsize if groupsize > 0 else cols, M)
    assert {c["SPLIT_K"] for c in configs} >= {1, 2, 4}  # 24 rows fill no GPU: split-K is on the list
    tiles = {(c["BLOCK_N"], c["BLOCK_W"], c["SPLIT_K"]): c for c in configs}
    for cfg in tiles.values():
        y = gemv(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize, config=cfg)
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        assert y.shape == (M, rows) and rel < 1e-5, (cfg, rel)


def test_gemv_configs_split_only_when_rows_cannot_fill_a_gpu():
    from tacq_lite.kernels.gemv import ENOUGH_PROGRAMS, segment_words

    small = gemv_configs(256, 4096, 3, 128, 1)
    assert max(c["SPLIT_K"] for c in small) == 8
    assert {c["SPLIT_K"] for c in gemv_configs(65536, 4096, 3, 128, 1)} == {1}  # rows alone fill it
    for rows in (256, 4096, 14336):
        for cfg in gemv_configs(rows, 4096, 3, 128, 1):
            assert cfg["SPLIT_K"] == 1 or -(-rows // cfg["BLOCK_N"]) * cfg["SPLIT_K"] <= ENOUGH_PROGRAMS
            assert cfg["BLOCK_W"] >= segment_words(4096, 3, 128) == 14  # a 3-bit group of 128 touches 14 words
    for cfg in gemv_configs(4096, 4096, 8, 128, 16):  # tl.dot needs dims >= 16 on a GPU
        assert cfg["BLOCK_N"] >= 16 and cfg["BLOCK_W"] * 4 >= 16


@needs_triton
def test_a_block_too_narrow_for_a_group_is_refused():
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=3, groupsize=64, kept_frac=0.0)
    cfg = dict(gemv_configs(*W.shape, 3, 64, 1)[0], BLOCK_W=4)  # a group of 64 touches 8 words
    with pytest.raises(ValueError, match="BLOCK_W=4"):
        gemv(torch.randn(1, W.shape[1]), packed, scale, zero, bits=3, groupsize=64, config=cfg)


def test_gemv_handles_a_zero_point_off_the_integers():
    """A float zero point (quant.find_params(round_zero=False), as GGUF's Q4_1 stores it) on both paths."""
    W = torch.randn(40, 640, generator=torch.Generator().manual_seed(3))
    scale, zero = quant.find_params(W, bits=3, groupsize=64, round_zero=False)
    assert (zero != zero.round()).any()
    codes = quant.quantize(W, scale, zero, bits=3)
    packed = P.pack(codes, bits=3)
    ref = quant.dequantize(codes, scale, zero).double()
    for M in (1, 4):
        x = torch.randn(M, 640)
        y = gemv(x, packed, scale, zero, bits=3, groupsize=64)
        assert ((y.double() - x.double() @ ref.T).norm() / (x.double() @ ref.T).norm()).item() < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_16_bit_inputs(dtype):
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=3, groupsize=64, kept_frac=0.01, rows=40, cols=1152)
    W_final = dense_final(W, mask, codes, scale, zero)
    for M in (1, 4):
        x = torch.randn(M, 1152).to(dtype)
        y = gemv(x, packed, scale, zero, kept, bits=3, groupsize=64)
        ref = x.double() @ W_final.T
        assert y.dtype == dtype
        # fp32 accumulation; the 16-bit output adds its own rounding (fp16 2^-11, bf16 2^-8 relative)
        assert ((y.double() - ref).norm() / ref.norm()).item() < {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def test_tuning_times_each_configuration_once_per_key(monkeypatch):
    tuning.forget()
    configs = [dict(name="a"), dict(name="b"), dict(name="c")]
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def timer(fn):
        return fn()

    def run(cfg):
        timed.append(cfg["name"])
        return cost[cfg["name"]]

    key = ("demo", 1)
    assert tuning.pick(key, configs, run, device="cuda", timer=timer)["name"] == "b"
    assert tuning.pick(key, configs, run, device="cuda", timer=timer)["name"] == "b"
    assert timed == ["a", "b", "c"]  # the second call is a lookup
    assert tuning.chosen()[key]["name"] == "b"
    assert tuning.pick(("cpu", 1), configs, run, device="cpu")["name"] == "a"  # untimed off a GPU
    monkeypatch.setenv("TACQ_LITE_KERNEL_TUNING", "0")
    assert tuning.pick(("off", 1), configs, run, device="cuda")["name"] == "a"  # switched off: untimed
    assert timed == ["a", "b", "c"] and ("cpu", 1) not in tuning.chosen() and ("off", 1) not in tuning.chosen()
    with pytest.raises(ValueError, match="no configurations"):
        tuning.pick(("empty",), [], run, device="cpu")
    tuning.forget()
    assert tuning.chosen() == {}


@needs_triton
def test_gemv_fp16_and_codes_under_kept_weights_do_not_matter():
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=3, groupsize=64, kept_frac=0.035)
    x = torch.randn(3, W.shape[1]).half()
    y = gemv(x, packed, scale, zero, kept, bits=3, groupsize=64)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, gemv_ref(x, packed, scale, zero, kept, bits=3, groupsize=64), rtol=1e-3, atol=1e-2)
    scrambled = torch.where(mask, torch.randint_like(codes, 0, 8), codes)  # any code may sit under a kept weight
    y2 = gemv(x, P.pack(scrambled, bits=3), scale, zero, kept, bits=3, groupsize=64)
    torch.testing.assert_close(y2, y, rtol=1e-3, atol=1e-2)


@needs_triton
def test_per_tensor_grid_and_dispatch():
    rows, cols = 24, 40
    W = torch.randn(rows, cols)
    scale, zero = quant.find_params(W, bits=4, per_tensor=True)  # [1, 1]
    packed = P.pack(quant.quantize(W, scale, zero, bits=4), bits=4)
    kept = P.pack_sparse(W, W.abs() > 2)
    x = torch.randn(2, 3, cols)  # leading dims are flattened by the dispatcher
    kw = dict(bits=4, groupsize=-1)
    y_torch = dequant_matmul(x, packed, scale, zero, kept, **kw, backend="torch")
    y_tri = dequant_matmul(x, packed, scale, zero, kept, **kw, backend="triton")
    assert y_torch.shape == (2, 3, rows)
    torch.testing.assert_close(y_tri, y_torch, rtol=1e-5, atol=1e-4)
    x_big = torch.randn(20, cols)  # M > 16: dequantize once, then linear
    torch.testing.assert_close(dequant_matmul(x_big, packed, scale, zero, kept, **kw, backend="triton"),
                               dequant_matmul(x_big, packed, scale, zero, kept, **kw), rtol=1e-5, atol=1e-4)
    W_tri = dequant_weight(packed, scale, zero, kept, bits=4, cols=cols, groupsize=-1, dtype=torch.float32, backend="triton")
    assert torch.equal(W_tri, dequant_weight(packed, scale, zero, kept, bits=4, cols=cols, groupsize=-1, dtype=torch.float32))


def test_choose_backend():
    x = torch.zeros(2, 3)
    assert choose_backend(x) == "torch"  # CPU tensors use the reference unless asked
    assert choose_backend(x, "torch") == "torch"
    with pytest.raises(ValueError, match="backend"):
        choose_backend(x, "cuda")


def test_bad_inputs_raise():
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=4, groupsize=64, kept_frac=0.035)
    rows, cols = W.shape
    x = torch.randn(2, cols)
    kw = dict(bits=4, groupsize=64)
    with pytest.raises(ValueError, match="words per row"):
        gemv_ref(torch.randn(2, cols + 64), packed, scale, zero, kept, **kw)
    with pytest.raises(TypeError, match="x must be"):
        gemv_ref(x.long(), packed, scale, zero, kept, **kw)
    with pytest.raises(ValueError, match="2-D"):
        gemv_ref(x[None], packed, scale, zero, kept, **kw)
    with pytest.raises(ValueError, match="scale shape"):
        gemv_ref(x, packed, scale[:, :1], zero, kept, **kw)
    with pytest.raises(TypeError, match="zero must be"):
        gemv_ref(x, packed, scale, zero.long(), kept, **kw)
    with pytest.raises(TypeError, match="int32"):
        gemv_ref(x, packed.long(), scale, zero, kept, **kw)
    with pytest.raises(ValueError, match="does not divide"):
        gemv_ref(x, packed, scale, zero, kept, bits=4, groupsize=100)
    with pytest.raises(ValueError, match="row_ptr"):
        gemv_ref(x, packed, scale, zero, kept._replace(row_ptr=kept.row_ptr[:-1]), **kw)
    with pytest.raises(ValueError, match="values must be fp16"):
        gemv_ref(x, packed, scale, zero, kept._replace(values=kept.values.float()), **kw)
    with pytest.raises(TypeError, match="dtype must be"):
        dequantize_packed_ref(packed, scale, zero, bits=4, cols=cols, groupsize=64, dtype=torch.int32)


@needs_triton
def test_gemv_rejects_large_batch():
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=2, groupsize=64, kept_frac=0.0)
    with pytest.raises(ValueError, match="M <= 16"):
        gemv(torch.randn(17, W.shape[1]), packed, scale, zero, bits=2, groupsize=64)
