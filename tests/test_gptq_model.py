"""GPTQ on real captured inputs of the embedded model's first decoder layers."""
import copy

import pytest
import torch

from tacq_lite.algo.gptq import GPTQ
from tacq_lite.core import quant
from tacq_lite.data import corpus
from tacq_lite.model import walk


def half_trace(H, W, W_hat):
    """½ tr(ΔW H ΔWᵀ) = ‖X Wᵀ − X Ŵᵀ‖² / n on the inputs that built H."""
    dW = (W - W_hat).double()
    return 0.5 * ((dW @ H.double()) * dW).sum().item()


@pytest.fixture(scope="module")
def two_layer_model(embedded_gguf):
    from tacq_lite.model import loading

    model, tok = loading.load_model()
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]  # the first two decoder layers are enough here
    windows = corpus.calibration_windows(tok, "wikitext2", n=4, seq_len=128, seed=0)
    return small, windows


@pytest.mark.parametrize("bits", [3, 2])
def test_gptq_beats_rtn_on_every_linear(two_layer_model, bits):
    model, windows = two_layer_model
    errs = {}

    def finish(name, linear, stats):
        W = linear.weight.data
        res = stats.quantize(bits=bits, mse=False)
        errs[name] = (half_trace(stats.H, W, res.W_hat), half_trace(stats.H, W, quant.quantize_dequantize(W, bits=bits)))
        # leave the layer unquantized: every linear sees full-precision inputs

    walk.sequential_pass(model, windows, make_stats=lambda _n, lin: GPTQ(lin), finish=finish, progress=False)
    assert len(errs) == 14
    for name, (gptq, rtn) in errs.items():
        assert gptq < rtn, f"{name}: GPTQ {gptq:.4g} >= RTN {rtn:.4g} at {bits} bits"


def test_random_masks_with_compensated_values_do_not_raise_the_layer_error(two_layer_model):
    """A random keep-mask on real captured inputs: storing the compensated value (the default, as the
    authors' gptq/gptq.py l. 207-290) keeps the true layer error ‖X Wᵀ − X Ŵᵀ‖² / n at or below
    GPTQ's without a mask; putting the original value back ("original") loses the compensation
    that earlier columns pushed onto the kept weights, so its error is higher.

    Not every linear stays at or below 1.0: a kept weight also leaves its row's range fit, which
    moves that row's whole grid, for better or worse (k_proj at 0.35 % measured 1.019x). So each
    linear may sit up to 3 % above, and the mean over the layer's seven linears must not."""
    model, windows = two_layer_model
    seen = {}

    def finish(name, linear, stats):
        if not name.startswith("model.layers.1."):  # layer 1: inputs shaped by a full-precision layer 0
            return
        W = linear.weight.data
        base = half_trace(stats.H, W, stats.quantize(bits=3, mse=False).W_hat)
        for ratio in (0.0035, 0.01, 0.03):
            mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < ratio  # [rows, cols]
            err = {kv: half_trace(stats.H, W, stats.quantize(bits=3, mse=False, mask=mask, keep_value=kv).W_hat)
                   for kv in ("compensated", "original")}
            seen[name, ratio] = (err["compensated"] / base, err["original"] / base)

    walk.sequential_pass(model, windows, make_stats=lambda _n, lin: GPTQ(lin), finish=finish, progress=False)
    assert len(seen) == 7 * 3
    for (name, ratio), (comp, orig) in seen.items():
        assert comp <= 1.03, f"{name} at {ratio:.2%}: compensated layer error {comp:.4f}x of no mask"
        assert comp < orig, f"{name} at {ratio:.2%}: compensated {comp:.4f}x, original {orig:.4f}x"
    for ratio in (0.0035, 0.01, 0.03):
        mean = sum(c for (_n, r), (c, _o) in seen.items() if r == ratio) / 7
        assert mean <= 1.0, f"at {ratio:.2%} the compensated layer error averages {mean:.4f}x of no mask"
