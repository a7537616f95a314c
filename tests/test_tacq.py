"""Tests for tacq_lite.run.tacq: TaCQ end to end on a tiny Llama, the score cache, selectors, errors."""
import pytest
import torch

from tacq_lite.algo import gradients, select
from tacq_lite.config import QuantConfig
from tacq_lite.model import walk
from tacq_lite.model.loading import tiny_llama
from tacq_lite.run import experiment, passes, score_cache
from tacq_lite.run.passes import bits_report
from tacq_lite.run.tacq import build_masks, compute_importance, tacq_quantize

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
TOTAL = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # tiny_llama: q, o 64x64; k, v 32x64; mlp 128x64


@pytest.fixture
def counts(monkeypatch):
    """Count backward passes (accumulate_gradients calls) and GPTQ passes."""
    seen = {"grads": 0, "squares": 0, "gptq": 0}
    grads, gptq = gradients.accumulate_gradients, passes.gptq_quantize

    def counting_grads(*a, **kw):
        seen["grads"] += 1
        seen["squares"] += bool(kw.get("squares"))
        return grads(*a, **kw)

    def counting_gptq(*a, **kw):
        seen["gptq"] += 1
        return gptq(*a, **kw)

    monkeypatch.setattr(gradients, "accumulate_gradients", counting_grads)
    monkeypatch.setattr(passes, "gptq_quantize", counting_gptq)
    return seen


def run(config, model=None, **kw):
    model = model or tiny_llama()
    result = tacq_quantize(model, WINDOWS, config, progress=False, **kw)
    return model, result, result.info


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The reference run: TaCQ at 1 % with an empty cache."""
    config = QuantConfig(method="tacq", bits=3, ratio=0.01, n_calib=4, seq_len=32,
                         cache_dir=str(tmp_path_factory.mktemp("scores")))
    original = {n: lin.weight.detach().clone() for n, lin in walk.named_linears(tiny_llama()).items()}
    model, result, info = run(config)
    return config, original, model, result, info


def test_end_to_end_keeps_exactly_k_weights(first):
    config, original, model, result, info = first
    assert sum(w.numel() for w in original.values()) == TOTAL
    k = select.n_keep(TOTAL, 0.01)
    assert info["gradients"] == info["qw"] == "computed" and info["n_backward"] == 4
    assert sum(result.n_kept.values()) == info["k"] == k
    assert set(result.seconds) >= {"qw", "gradients", "score", "gptq"}
    assert set(result.layer_loss) == set(original)
    changed = moved = 0
    for name, lin in walk.named_linears(model).items():
        mask = result.masks[name]
        scale, zero = result.grids[name]
        on_grid = quant_error(lin.weight.detach(), scale, zero) < 1e-5  # [rows, cols]
        changed += int((lin.weight[~mask] != original[name][~mask]).sum())
        moved += int((lin.weight[mask] != original[name][mask]).sum())
        assert on_grid[~mask].all()
    assert changed > 0.9 * (TOTAL - k)  # everything else went through the 3-bit grid
    assert moved > 0.5 * k  # kept weights hold GPTQ's compensated value (keep_value="compensated")


def test_keep_value_original_puts_the_kept_weights_back_bit_for_bit(first):
    """The same masks; the kept values differ. The score cache written by `first` serves this run:
    keep_value is not part of its key (the first pass has no mask). The first linears to be quantized
    (layer 0's q/k/v, which read the full-precision embeddings) come out the same; every later one
    sees inputs computed with the other kept values, so its rounding may differ."""
    config, original, model1, result1, _ = first
    model, result, info = run(config.replace(keep_value="original"))
    assert info["qw"] == info["gradients"] == "cache"
    for name, lin in walk.named_linears(model).items():
        mask = result.masks[name]
        assert torch.equal(mask, result1.masks[name])
        assert torch.equal(lin.weight[mask], original[name][mask])  # bit for bit
        if name.startswith("model.layers.0.self_attn.") and not name.endswith("o_proj"):
            assert torch.equal(lin.weight[~mask], walk.named_linears(model1)[name].weight[~mask])


def quant_error(W, scale, zero):
    """|W − dequant(quant(W))| [rows, cols] on the (scale, zero) grid: 0 for weights on the grid."""
    from tacq_lite.core import quant

    return (W - quant.dequantize(quant.quantize(W, scale, zero, bits=3), scale, zero)).abs()


def test_forked_worker_overlaps_the_first_pass_and_gives_the_same_masks(first, tmp_path, monkeypatch):
    """With two torch threads, the backward passes run in a forked worker beside the first GPTQ pass."""
    config, _, _, result1, info1 = first
    assert info1["gradient_processes"] == 1  # the test session runs torch on one thread: no worker
    threads_seen = []
    first_pass = passes.gptq_quantize

    def recording_gptq(*a, **kw):
        threads_seen.append(torch.get_num_threads())
        return first_pass(*a, **kw)

    monkeypatch.setattr(passes, "gptq_quantize", recording_gptq)
    torch.set_num_threads(2)
    try:
        _, result2, info2 = run(config.replace(cache_dir=str(tmp_path)))
        _, result3, info3 = run(config.replace(cache_dir=str(tmp_path / "off"), parallel=False))
    finally:
        torch.set_num_threads(1)
    assert info2["gradient_processes"] == 2 and info2["n_backward"] == 4
    assert info3["gradient_processes"] == 1
    assert threads_seen == [1, 2, 2, 2]  # Q(W) on one thread beside the worker; the final passes on two
    for name, m in result1.masks.items():
        assert torch.equal(result2.masks[name], m) and torch.equal(result3.masks[name], m), name


def test_new_ratio_reuses_the_cache_without_backward_or_first_gptq(first, counts):
    config, _, _, result1, _ = first
    _, result2, info = run(config.replace(ratio=0.02))
    assert counts == {"grads": 0, "squares": 0, "gptq": 1}  # only the final masked GPTQ
    assert info["gradients"] == info["qw"] == "cache"
    assert sum(result2.n_kept.values()) == select.n_keep(TOTAL, 0.02)
    for name, m in result1.masks.items():
        assert not (m & ~result2.masks[name]).any()  # top-1 % is inside top-2 %
    # The same ratio again from the cache: the very same masks as the fresh run.
    _, result3, _ = run(config)
    assert all(torch.equal(result1.masks[n], result3.masks[n]) for n in result1.masks)


def test_selectors_without_gradients_skip_the_backward_passes(first, counts):
    config = first[0]
    _, result, info = run(config.replace(selector="magnitude"))
    assert counts["grads"] == 0 and counts["gptq"] == 1 and info["n_backward"] == 0
    model = tiny_llama()
    W = {n: lin.weight.detach().abs() for n, lin in walk.named_linears(model).items()}
    want = select.select_topk(W, ratio=config.ratio)
    assert all(torch.equal(result.masks[n], want[n]) for n in want)
    _, r1, _ = run(config.replace(selector="random", seed=1))
    _, r2, _ = run(config.replace(selector="random", seed=2))
    assert any(not torch.equal(r1.masks[n], r2.masks[n]) for n in r1.masks)
    assert counts["grads"] == 0


def test_new_bit_width_reuses_gradients_only(first, counts):
    _, _, info = run(first[0].replace(bits=4))
    assert counts["grads"] == 0 and counts["gptq"] == 2
    assert info["gradients"] == "cache" and info["qw"] == "computed"


def test_fisher_adds_squares_once_then_hessian_and_owq_use_cached_stats(first, counts):
    config = first[0]
    inputs = compute_importance(tiny_llama(), WINDOWS, config.replace(selector="fisher"), progress=False)
    assert counts["squares"] == 1 and counts["gptq"] == 0 and inputs.G2 is not None
    compute_importance(tiny_llama(), WINDOWS, config.replace(selector="fisher"), progress=False)
    assert counts["grads"] == 1  # Σg² is cached now
    k = select.n_keep(TOTAL, config.ratio)
    for selector in ("hessian", "activation", "owq_columns"):
        inputs = compute_importance(tiny_llama(), WINDOWS, config, selector=selector, progress=False)
        masks = build_masks(inputs, selector=selector, ratio=0.05 if selector == "owq_columns" else config.ratio)
        kept = sum(int(m.sum()) for m in masks.values())
        if selector == "owq_columns":
            assert 0 < kept <= select.n_keep(TOTAL, 0.05)
            assert all(torch.equal(m.any(0), m.all(0)) for m in masks.values())  # whole columns
        else:
            assert kept == k
    assert counts["grads"] == 1 and counts["gptq"] == 0


def test_ratio_zero_is_plain_gptq(counts, tmp_path):
    config = QuantConfig(method="tacq", ratio=0.0, n_calib=4, seq_len=32, cache_dir=str(tmp_path))
    model, result, _ = run(config)
    plain = tiny_llama()
    passes.gptq_quantize(plain, WINDOWS, config, progress=False)
    assert counts == {"grads": 0, "squares": 0, "gptq": 2}
    assert set(result.n_kept.values()) == {0} and result.masks == {}
    for (_, a), (_, b) in zip(walk.named_linears(model).items(), walk.named_linears(plain).items()):
        assert torch.equal(a.weight, b.weight)


def test_quantize_model_reports_kept_bits(first):
    result = experiment.quantize_model(tiny_llama(), WINDOWS, first[0], progress=False)
    assert result.bits.n_kept == sum(result.n_kept.values()) == select.n_keep(TOTAL, 0.01)
    assert result.bits.avg_bits > bits_report(tiny_llama(), first[0].replace(method="gptq")).avg_bits


def test_bad_settings_fail_before_any_work(counts):
    with pytest.raises(ValueError, match="unknown; choose one of tacq"):
        run(QuantConfig(method="tacq", selector="salience"))
    assert counts["gptq"] == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        QuantConfig(ratio=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        build_masks(compute_importance(tiny_llama(), WINDOWS, QuantConfig(selector="magnitude")),
                    selector="magnitude", ratio=1.0)


def test_blocked_model_and_damaged_cache(tmp_path, counts):
    config = QuantConfig(method="tacq", selector="gradient", ratio=0.01, cache_dir=str(tmp_path))
    model = tiny_llama()
    model.model.norm.register_forward_hook(lambda _m, _a, out: out.detach())
    with pytest.raises(RuntimeError, match="No gradient reached"):
        run(config, model)
    run(config, cache=False)
    assert not list(tmp_path.iterdir())  # cache=False writes nothing
    run(config)
    (path,) = tmp_path.glob("gradients-*.safetensors")
    path.write_bytes(path.read_bytes()[:1000])  # a damaged file: warned about, then recomputed
    with pytest.warns(score_cache.CacheWarning, match="unreadable"):
        _, _, info = run(config)
    assert info["gradients"] == "computed" and counts["grads"] == 4


@pytest.mark.parametrize("dtype, grad_dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                               ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_the_worker_decision_is_the_same_before_and_after_loading(dtype, grad_dtype):
    """The byte budget asks before loading (model=None) and the run asks with the model: one answer.
    The worker runs only where the weights already have the gradient dtype, two threads are there,
    the device is the CPU and nothing turned it off."""
    import sys

    from tacq_lite.run.tacq import uses_gradient_worker

    config = QuantConfig(method="tacq", dtype=dtype, grad_dtype=grad_dtype)
    model = tiny_llama().to(getattr(torch, dtype))
    cpu = torch.device("cpu")
    torch.set_num_threads(2)
    try:
        before, after = uses_gradient_worker(config, cpu), uses_gradient_worker(config, cpu, model)
        assert before == after == (dtype == grad_dtype and sys.platform.startswith("linux"))
        assert not uses_gradient_worker(config.replace(parallel=False), cpu, model)
        assert not uses_gradient_worker(config.replace(checkpointing=True), cpu)
        assert not uses_gradient_worker(config, torch.device("meta"))  # not the CPU: no fork
    finally:
        torch.set_num_threads(1)
    assert not uses_gradient_worker(config, cpu, model)  # one thread: nothing to run beside
