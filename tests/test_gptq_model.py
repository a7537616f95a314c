"""GPTQ on real captured inputs of the embedded model's first decoder layers."""
import copy

import pytest

from tacq_lite import data, quant, walk
from tacq_lite.gptq import GPTQ


@pytest.fixture(scope="module")
def two_layer_model(embedded_gguf):
    from tacq_lite import models

    model, tok = models.load_model()
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]  # the first two decoder layers are enough here
    windows = data.calibration_windows(tok, "wikitext2", n=4, seq_len=128, seed=0)
    return small, windows


@pytest.mark.parametrize("bits", [3, 2])
def test_gptq_beats_rtn_on_every_linear(two_layer_model, bits):
    model, windows = two_layer_model
    errs = {}

    def half_trace(H, W, W_hat):  # ½ tr(ΔW H ΔWᵀ) = ‖X Wᵀ − X Ŵᵀ‖² / n on the captured inputs
        dW = (W - W_hat).double()
        return 0.5 * ((dW @ H.double()) * dW).sum().item()

    def finish(name, linear, stats):
        W = linear.weight.data
        res = stats.quantize(bits=bits, mse=False)
        errs[name] = (half_trace(stats.H, W, res.W_hat), half_trace(stats.H, W, quant.quantize_dequantize(W, bits=bits)))
        # leave the layer unquantized: every linear sees full-precision inputs

    walk.sequential_pass(model, windows, make_stats=lambda _n, lin: GPTQ(lin), finish=finish, progress=False)
    assert len(errs) == 14
    for name, (gptq, rtn) in errs.items():
        assert gptq < rtn, f"{name}: GPTQ {gptq:.4g} >= RTN {rtn:.4g} at {bits} bits"
