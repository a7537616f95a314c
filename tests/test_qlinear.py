import copy
import json

import pytest
import torch
from torch import nn

from tacq_lite import QuantConfig, tiny_llama
from tacq_lite.core.pack import packed_cols
from tacq_lite.core.quant import dequantize, find_params, quantize
from tacq_lite.model.checkpoint import FORMAT_VERSION, META_FILE, TENSOR_FILE, load_quantized, save_quantized
from tacq_lite.model.qlinear import QuantLinear, convert_model, quant_linears
from tacq_lite.run.experiment import quantize_model


def _fake_quant_linear(rows=24, cols=40, bits=3, groupsize=-1, seed=0, keep=0.05):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, rows, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=gen))
        lin.bias.copy_(torch.randn(rows, generator=gen))
    W = lin.weight.detach().clone()
    mask = torch.rand(rows, cols, generator=gen) < keep
    scale, zero = find_params(W, bits=bits, groupsize=groupsize, mask=mask)
    W_hat = dequantize(quantize(W, scale, zero, bits=bits), scale, zero)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, W, W_hat))
    return lin, scale, zero, mask, W


@pytest.mark.parametrize("bits, groupsize", [(2, -1), (3, -1), (3, 8), (4, 20)])
def test_from_linear_stores_the_fake_quantized_layer(bits, groupsize):
    lin, scale, zero, mask, W = _fake_quant_linear(bits=bits, groupsize=groupsize)
    q = QuantLinear.from_linear(lin, scale=scale, zero=zero, bits=bits, groupsize=groupsize, mask=mask)
    # Codes survive exactly; the only change is the fp16 storage of scale (and of kept values).
    s16 = scale.half().float()
    expect = torch.where(mask, W.half().float(),
                         dequantize(quantize(lin.weight, scale, zero, bits=bits), s16, zero))
    assert torch.equal(q.dequantized_weight(), expect)
    assert q.nnz == int(mask.sum()) > 0
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(q(x), nn.functional.linear(x, expect, lin.bias), rtol=1e-5, atol=1e-5)
    # vs the fp32-scale fake quantization: |dy| <= 2**-11 * sum |x| |W| (one fp16 rounding of each scale/value)
    bound = 2.0**-11 * (x.abs() @ lin.weight.abs().T)  # [3, 5, rows]
    assert ((q(x) - lin(x)).abs() <= bound + 1e-5).all()


def test_triton_backend_matches_torch_backend():
    lin, scale, zero, mask, _ = _fake_quant_linear(rows=20, cols=70, bits=3, keep=0.03)
    q = QuantLinear.from_linear(lin, scale=scale, zero=zero, bits=3, mask=mask)
    x = torch.randn(2, 70)
    y_torch = q(x)
    q.backend = "triton"  # the interpreter runs the GEMV kernel on CPU (conftest sets TRITON_INTERPRET=1)
    torch.testing.assert_close(q(x), y_torch, rtol=1e-5, atol=1e-5)


def test_nbytes_is_the_packed_layout():
    rows, cols, gs = 24, 40, 8
    lin, scale, zero, mask, _ = _fake_quant_linear(rows, cols, bits=3, groupsize=gs)
    q = QuantLinear.from_linear(lin, scale=scale, zero=zero, bits=3, groupsize=gs, mask=mask)
    nnz = int(mask.sum())
    # codes (10 per int32) + fp16 scale and zero per group + CSR (int32 row_ptr, int16 cols, fp16 values)
    assert q.nbytes() == rows * packed_cols(cols, bits=3) * 4 + 2 * rows * (cols // gs) * 2 + (rows + 1) * 4 + nnz * 4
    assert packed_cols(cols, bits=3) == 4


def test_off_grid_weights_are_refused():
    lin, scale, zero, mask, _ = _fake_quant_linear()
    with pytest.raises(ValueError, match="off the given grid"):
        QuantLinear.from_linear(lin, scale=scale, zero=zero, bits=3)  # kept weights but no mask
    with pytest.raises(ValueError, match="do not fit"):
        QuantLinear.from_linear(lin, scale=scale[:, :1].repeat(1, 2), zero=zero, bits=3, mask=mask)
    with pytest.raises(ValueError, match="mask must be bool"):
        QuantLinear.from_linear(lin, scale=scale, zero=zero, bits=3, mask=mask.float())


def test_forward_refuses_inputs_of_the_wrong_width():
    lin, scale, zero, mask, _ = _fake_quant_linear(rows=8, cols=576, bits=3)
    q = QuantLinear.from_linear(lin, scale=scale, zero=zero, bits=3, mask=mask)
    assert q(torch.randn(2, 576)).shape == (2, 8)
    for width in (571, 575, 577, 580):  # 3-bit codes pack 10 per word: these all fit the packed buffer
        with pytest.raises(ValueError, match=f"input has {width} features .* in_features=576"):
            q(torch.randn(2, width))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_features_are_refused():
    for in_f, out_f in ((0, 8), (8, 0), (0, 0)):
        with pytest.raises(ValueError, match="at least one input and one output feature"):
            QuantLinear(in_f, out_f, bits=3)
    with pytest.raises(ValueError, match="linear.weight is empty"):
        QuantLinear.from_linear(nn.Linear(0, 8), scale=torch.ones(8, 1), zero=torch.zeros(8, 1), bits=3)


# ---------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def packed_tiny():
    """A tiny Llama quantized with TaCQ (2 % kept), its fake-quantized twin, and the packed copy."""
    model = tiny_llama()
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="tacq", bits=3, ratio=0.02, n_calib=4, seq_len=32, mse=False)
    result = quantize_model(model, windows, cfg, progress=False)
    packed = convert_model(copy.deepcopy(model), result.grids, bits=3, masks=result.masks)
    return model, packed, result


def test_convert_model_keeps_the_outputs(packed_tiny):
    fake, packed, result = packed_tiny
    x = torch.randint(0, 256, (2, 16))
    assert len(quant_linears(packed)) == 14
    assert sum(q.nnz for q in quant_linears(packed).values()) == result.bits.n_kept > 0
    torch.testing.assert_close(packed(x).logits, fake(x).logits, rtol=2e-3, atol=2e-3)


def test_dtype_casts_leave_the_stored_fp16_tensors_alone(packed_tiny):
    """model.to(bfloat16) / .half() cast the rest of the model; the packed layers keep their fp16 grid and
    kept weights bit for bit, and the cast model computes what its float32 twin does, to bf16 rounding."""
    _, packed, _ = packed_tiny
    x = torch.randint(0, 256, (1, 12))
    before = {n: {k: b.clone() for k, b in q.named_buffers()} for n, q in quant_linears(packed).items()}
    bf16 = copy.deepcopy(packed).to(torch.bfloat16)
    half = copy.deepcopy(packed).half().float()  # cast away and back: nothing packed may round
    for model in (bf16, half):
        for n, q in quant_linears(model).items():
            for k, b in q.named_buffers():
                assert b.dtype == before[n][k].dtype and torch.equal(b, before[n][k]), (n, k)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = packed(x).logits
    torch.testing.assert_close(bf16(x).logits.float(), ref, rtol=0.05, atol=0.05)


def test_the_quantizers_codes_are_packed_as_they_are(packed_tiny):
    """GPTQ's own codes go to disk; re-deriving them from the weights gives the same words off the mask."""
    from tacq_lite.core.pack import unpack

    fake, packed, result = packed_tiny
    carried = convert_model(copy.deepcopy(fake), result.grids, bits=3, masks=result.masks, codes=result.codes)
    for name, q in quant_linears(carried).items():
        off = ~result.masks.get(name, torch.zeros_like(result.codes[name], dtype=torch.bool))
        assert torch.equal(unpack(q.qweight, bits=3, cols=q.in_features), result.codes[name])
        derived = unpack(quant_linears(packed)[name].qweight, bits=3, cols=q.in_features)
        assert torch.equal(derived[off], result.codes[name][off])
        assert torch.equal(q.dequantized_weight(), quant_linears(packed)[name].dequantized_weight())
    bad = {n: c.clone() for n, c in result.codes.items()}
    name = next(iter(bad))
    flip = (~result.masks[name]).nonzero()[0].tolist() if name in result.masks else [0, 0]
    bad[name][flip[0], flip[1]] ^= 1  # one code that no longer reproduces the weight
    with pytest.raises(ValueError, match="off the given grid"):
        convert_model(copy.deepcopy(fake), result.grids, bits=3, masks=result.masks, codes=bad)


def test_convert_needs_every_grid(packed_tiny):
    fake, _, result = packed_tiny
    grids = dict(result.grids)
    grids.pop(next(iter(grids)))
    with pytest.raises(KeyError, match="no grid for 1 linears"):
        convert_model(copy.deepcopy(fake), grids, bits=3, masks=result.masks)


def test_save_load_round_trip(packed_tiny, tmp_path):
    _, packed, _ = packed_tiny
    meta = save_quantized(packed, tmp_path / "m", info={"note": "tiny"}, unquantized_dtype="float32")
    assert meta["format_version"] == FORMAT_VERSION and meta["info"] == {"note": "tiny"}
    assert not list(tmp_path.glob("m.tmp-*"))  # no temporary folder left behind
    loaded, tok, meta2 = load_quantized(tmp_path / "m")
    assert tok is None and meta2["files"] == meta["files"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again after loading
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(x).logits, packed(x).logits)
    size = meta["files"][TENSOR_FILE]["bytes"]
    assert size > meta["bytes"]["quantized_linears"] + meta["bytes"]["other_tensors"]  # + the header
    assert size < meta["bytes"]["quantized_linears"] + meta["bytes"]["other_tensors"] + 64 * 1024


def test_save_refuses_to_clobber(packed_tiny, tmp_path):
    _, packed, _ = packed_tiny
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a tacq_lite model"):
        save_quantized(packed, other)
    assert (other / "keep.txt").read_text() == "mine"
    save_quantized(packed, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(packed, tmp_path / "m")
    save_quantized(packed, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes"]
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(tiny_llama(), tmp_path / "plain")


def test_interrupted_save_leaves_nothing(packed_tiny, tmp_path, monkeypatch):
    _, packed, _ = packed_tiny
    from tacq_lite.model import checkpoint

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(packed, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(packed_tiny, tmp_path):
    save_quantized(packed_tiny[1], tmp_path / "m")
    return tmp_path / "m"


def test_truncated_file_is_refused(saved):
    f = saved / TENSOR_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(saved)


def test_corrupted_file_is_refused(saved):
    f = saved / TENSOR_FILE
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_quantized(saved)


def test_unknown_format_version_is_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1} is not supported"):
        load_quantized(saved)


def test_config_disagreeing_with_tensors_is_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][name]["nnz"] += 1
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="disagree"):
        load_quantized(saved)


def test_missing_metadata_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--save"):
        load_quantized(tmp_path)
