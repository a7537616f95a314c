import pytest
import torch

from tacq_lite.core import pack as P
from tacq_lite.core import quant


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (5, 10), (4, 33), (6, 136), (2, 161)])
def test_pack_round_trip_is_exact(bits, rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    codes[0, -1] = 2**bits - 1  # the top code sets the word's sign bit for 2-bit
    packed = P.pack(codes, bits=bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, P.packed_cols(cols, bits=bits))
    assert torch.equal(P.unpack(packed, bits=bits, cols=cols), codes)


def test_packing_units_and_bit_positions():
    assert [P.codes_per_word(b) for b in (2, 3, 4, 8)] == [16, 10, 8, 4]
    assert P.packed_cols(17, bits=2) == 2 and P.packed_cols(20, bits=3) == 2 and P.packed_cols(21, bits=3) == 3
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert P.pack(codes, bits=4).item() == 1 | 2 << 4 | 3 << 8  # code k at bits * k
    assert P.pack(codes, bits=3).item() == 1 | 2 << 3 | 3 << 6
    top = torch.full((1, 16), 3, dtype=torch.uint8)
    assert P.pack(top, bits=2).item() == -1  # all 32 bits set, read as a signed int32


def test_pack_matches_quantizer_output():
    W = torch.randn(8, 96)
    scale, zero = quant.find_params(W, bits=3, groupsize=32)
    codes = quant.quantize(W, scale, zero, bits=3)
    assert torch.equal(P.unpack(P.pack(codes, bits=3), bits=3, cols=96), codes)


@pytest.mark.parametrize("bad", [torch.tensor([[0, 4]]), torch.tensor([[-1, 0]]), torch.tensor([[0, 255]], dtype=torch.uint8)])
def test_out_of_range_codes_raise(bad):
    with pytest.raises(ValueError, match="must lie in"):
        P.pack(bad, bits=2)


def test_pack_rejects_bad_inputs():
    with pytest.raises(TypeError):
        P.pack(torch.zeros(2, 3), bits=2)  # float codes
    with pytest.raises(ValueError):
        P.pack(torch.zeros(2, 3, 4, dtype=torch.uint8), bits=2)
    with pytest.raises(ValueError, match="not supported"):
        P.pack(torch.zeros(2, 3, dtype=torch.uint8), bits=5)
    with pytest.raises(ValueError, match="words per row"):
        P.unpack(torch.zeros(2, 3, dtype=torch.int32), bits=4, cols=8)
    with pytest.raises(TypeError):
        P.unpack(torch.zeros(2, 1, dtype=torch.int64), bits=4, cols=8)


def _random_mask(rows, cols, frac, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < frac


@pytest.mark.parametrize("frac", [0.0, 0.05, 1.0])
def test_sparse_round_trip(frac):
    W = torch.randn(7, 40)
    mask = _random_mask(7, 40, frac, seed=1)
    mask[2] = False  # an empty row in the middle
    kept = P.pack_sparse(W, mask)
    assert kept.row_ptr.dtype == torch.int32 and kept.row_ptr.shape == (8,)
    assert kept.values.dtype == torch.float16 and kept.values.numel() == mask.sum()
    assert kept.row_ptr[3] == kept.row_ptr[2]
    dense, mask_back = P.unpack_sparse(kept, (7, 40))
    assert torch.equal(mask_back, mask)
    assert torch.equal(dense, torch.where(mask, W.half(), torch.zeros((), dtype=torch.float16)))
    assert torch.equal(P.kept_rows(kept), mask.nonzero()[:, 0])


def test_sparse_empty_mask():
    kept = P.pack_sparse(torch.randn(3, 5), torch.zeros(3, 5, dtype=torch.bool))
    assert kept.values.numel() == 0 and kept.row_ptr.tolist() == [0, 0, 0, 0]
    dense, mask = P.unpack_sparse(kept, (3, 5))
    assert not mask.any() and not dense.any()


def test_index_dtype_follows_cols():
    for cols, dtype in [(32767, torch.int16), (32768, torch.int32)]:
        mask = torch.zeros(2, cols, dtype=torch.bool)
        mask[1, cols - 1] = True  # the largest column index must survive the cast
        kept = P.pack_sparse(torch.randn(2, cols), mask)
        assert kept.col_idx.dtype == dtype
        assert kept.col_idx.item() == cols - 1


def test_sparse_rejects_bad_inputs():
    W = torch.randn(3, 4)
    with pytest.raises(ValueError):
        P.pack_sparse(W, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        P.pack_sparse(W, torch.zeros(3, 4))  # not bool
    with pytest.raises(ValueError, match="overflow fp16"):
        P.pack_sparse(torch.full((1, 2), 1e6), torch.ones(1, 2, dtype=torch.bool))
    kept = P.pack_sparse(W, W > 0)
    with pytest.raises(ValueError, match="row_ptr"):
        P.unpack_sparse(kept, (4, 4))
    with pytest.raises(ValueError, match="col_idx out of range"):
        P.unpack_sparse(kept, (3, 2))


def test_packed_nbytes_counts_every_buffer():
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    packed = P.pack(codes, bits=4)  # 16 rows * 8 words * 4 bytes
    scale = zero = torch.ones(16, 1, dtype=torch.float16)
    mask = torch.zeros(16, 64, dtype=torch.bool)
    mask[0, :3] = True
    kept = P.pack_sparse(torch.randn(16, 64), mask)
    assert P.packed_nbytes(packed, scale, zero) == 512 + 32 + 32
    assert P.packed_nbytes(packed, scale, zero, kept) == 576 + 17 * 4 + 3 * 2 + 3 * 2
