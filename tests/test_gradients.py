"""Tests for tacq_lite.algo.gradients (and run.parallel's worker): G = Σ|per-sample grad| against brute force, answer masks, errors."""
import time

import pytest
import torch

from tacq_lite.algo.gradients import accumulate_gradients
from tacq_lite.model import walk
from tacq_lite.model.loading import tiny_llama


def windows(n=3, T=12, seed=0):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def brute_force(model, samples, labels_of):
    """Σ|g|, Σg² and Σg with a plain backward per sample, HF's own loss (labels -100 are ignored)."""
    G, G2, S = {}, {}, {}
    for ids in samples:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids[None], labels=labels_of(ids)[None]).loss.backward()
        for name, lin in walk.named_linears(model).items():
            g = lin.weight.grad.detach()  # [rows, cols]
            G[name] = G.get(name, 0) + g.abs()
            G2[name] = G2.get(name, 0) + g.square()
            S[name] = S.get(name, 0) + g
    model.zero_grad(set_to_none=True)
    return G, G2, S


def test_G_is_the_sum_of_absolute_per_sample_gradients():
    model = tiny_llama(layers=2)
    x = windows()
    res = accumulate_gradients(model, x, squares=True, progress=False)
    G, G2, S = brute_force(model, x, lambda ids: ids)
    assert res.n_samples == 3 and res.n_tokens == 3 * 11 and res.seconds_per_sample > 0
    assert set(res.G) == set(walk.named_linears(model))
    for name in G:
        assert torch.allclose(res.G[name], G[name], rtol=1e-4, atol=1e-7), name
        assert torch.allclose(res.G2[name], G2[name], rtol=1e-4, atol=1e-10), name
    # |g| summed per sample is not |Σg|: the abs really is taken before summing.
    name = "model.layers.0.mlp.down_proj"
    assert (res.G[name] > S[name].abs() * 1.01 + 1e-7).any()


def test_model_comes_back_unchanged():
    model = tiny_llama(layers=1)
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    accumulate_gradients(model, windows(n=1), progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_answer_only_loss_matches_masked_labels():
    model = tiny_llama(layers=1)
    x = windows(n=2, T=10, seed=1)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[6:] = True  # the "answer": last four tokens
    pairs = [(ids, mask) for ids in x]
    res = accumulate_gradients(model, pairs, progress=False)
    G, _, _ = brute_force(model, x, lambda ids: torch.where(mask, ids, torch.full_like(ids, -100)))
    for name in G:
        assert torch.allclose(res.G[name], G[name], rtol=1e-4, atol=1e-7), name
    assert res.n_tokens == 2 * 4
    # loss="all" ignores the mask and reproduces the text-window result.
    everything = accumulate_gradients(model, pairs, loss="all", progress=False)
    text = accumulate_gradients(model, x, progress=False)
    name = "model.layers.0.self_attn.v_proj"
    assert torch.allclose(everything.G[name], text.G[name])
    assert not torch.allclose(res.G[name], text.G[name])


def test_empty_answer_and_bad_inputs_are_rejected():
    model = tiny_llama(layers=1)
    ids = windows(n=1)[0]
    only_first = torch.zeros_like(ids, dtype=torch.bool)
    only_first[0] = True  # position 0 is never predicted
    with pytest.raises(ValueError, match="no scored token"):
        accumulate_gradients(model, [(ids, only_first)], progress=False)
    with pytest.raises(ValueError, match="answer"):
        accumulate_gradients(model, windows(), loss="answer", progress=False)
    with pytest.raises(ValueError, match="loss"):
        accumulate_gradients(model, windows(), loss="mean", progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        accumulate_gradients(model, windows().float(), progress=False)


def test_blocked_gradients_give_a_clear_error_and_restore_the_model():
    model = tiny_llama(layers=2)
    # A hook that detaches layer 0's output: layer 0's weights can no longer reach the loss.
    handle = model.model.layers[0].register_forward_hook(
        lambda _m, _a, out: tuple(o.detach() if torch.is_tensor(o) else o for o in out)
        if isinstance(out, tuple) else out.detach()
    )
    with pytest.raises(RuntimeError, match=r"No gradient reached 7 of 14 .*layers\.0"):
        accumulate_gradients(model, windows(n=1), progress=False)
    handle.remove()
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    # Detaching everything: the loss itself has no graph.
    handle = model.model.norm.register_forward_hook(lambda _m, _a, out: out.detach())
    with pytest.raises(RuntimeError, match="No gradient reached 14 of 14"):
        accumulate_gradients(model, windows(n=1), progress=False)
    handle.remove()


def test_inference_tensors_are_explained():
    with torch.inference_mode():
        model = tiny_llama(layers=1)
    with pytest.raises(RuntimeError, match="inference_mode"):
        accumulate_gradients(model, windows(n=1), progress=False)


def test_low_precision_accumulators_and_checkpointing_agree():
    model = tiny_llama(layers=2)
    x = windows(n=2)
    ref = accumulate_gradients(model, x, progress=False)
    low = accumulate_gradients(model, x, accum_dtype=torch.bfloat16, accum_device="cpu", progress=False)
    ckpt = accumulate_gradients(model, x, checkpointing=True, progress=False)
    assert not model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    for name, g in ref.G.items():
        assert low.G[name].dtype == torch.bfloat16
        assert torch.allclose(low.G[name].float(), g, rtol=1e-2, atol=1e-6), name
        assert torch.allclose(ckpt.G[name], g, rtol=1e-4, atol=1e-7), name


# ------------------------------------------------- forked worker ----


def test_the_worker_and_this_process_give_the_one_process_sums_bit_for_bit():
    from tacq_lite.run.parallel import GradientWorker

    model = tiny_llama(layers=2)
    x = windows(n=7)
    ref = accumulate_gradients(model, x, squares=True, progress=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    par = GradientWorker(model, x, squares=True).result(progress=False)
    assert (par.n_samples, par.n_tokens) == (ref.n_samples, ref.n_tokens) == (7, 7 * 11)
    for name, g in ref.G.items():  # samples added in order, whoever ran them: the same sums, bit for bit
        assert par.G[name].dtype == torch.float32
        assert torch.equal(par.G[name], g) and torch.equal(par.G2[name], ref.G2[name]), name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # The worker works on its own from the start; result() stops it after its current sample and
    # takes the rest here.
    job = GradientWorker(model, x)
    deadline = time.monotonic() + 60
    while job._next.value < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    res = job.result(progress=False)
    assert not job._process.is_alive() and job._process.exitcode == 0
    assert 2 <= job.taken_by_worker <= 7 and job._child_tokens.value == job.taken_by_worker * 11
    assert all(torch.equal(res.G[n], g) for n, g in ref.G.items())
    again = GradientWorker(model, x).result(progress=False)  # stopped at once: this process does nearly all
    assert all(torch.equal(again.G[n], g) for n, g in ref.G.items())


def test_a_samples_gradient_does_not_depend_on_the_thread_count():
    """What makes the handed-over sum bit-identical: the worker runs one thread, this process all of
    them, and each sample's gradient comes out the same either way (checked here on this machine)."""
    model = tiny_llama(hidden=128, intermediate=384, layers=2)
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = accumulate_gradients(model, x, progress=False).G
        torch.set_num_threads(2)
        two = accumulate_gradients(model, x, progress=False).G
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_a_failing_worker_is_reported(monkeypatch):
    import os

    from tacq_lite.algo import gradients
    from tacq_lite.run.parallel import GradientWorker

    parent = os.getpid()
    real = gradients.backward_sample

    def loss_failing_in_the_child(model, ids, mask):
        if os.getpid() != parent:
            raise MemoryError("worker ran out of memory")
        return real(model, ids, mask)

    monkeypatch.setattr(gradients, "backward_sample", loss_failing_in_the_child)
    model = tiny_llama(layers=1)
    job = GradientWorker(model, windows(n=4))
    job._process.join(60)  # it fails on its first sample
    with pytest.raises(RuntimeError, match="worker process failed.*MemoryError.*--no-parallel"):
        job.result(progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_worker_cancel_and_usable():
    from tacq_lite.run.parallel import GradientWorker

    model = tiny_llama(layers=1)
    job = GradientWorker(model, windows(n=50))
    job.cancel()
    assert not job._process.is_alive()
    assert not GradientWorker.usable(model)  # the test session runs torch on one thread
    assert GradientWorker.usable(model, any_threads=True)


def test_loss_without_logits_to_keep_is_the_same():
    """A model whose forward has no logits_to_keep gets full logits; the loss reads the same rows."""
    from torch import nn

    from tacq_lite.algo.gradients import sample_loss

    class NoKeep(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    model = tiny_llama(layers=1)
    ids = windows(n=1, T=16)[0]
    mask = torch.zeros(16, dtype=torch.bool)
    mask[9:] = True
    with torch.no_grad():
        kept, full = sample_loss(model, ids, mask), sample_loss(NoKeep(model), ids, mask)
        logits = model(input_ids=ids[None]).logits[0]  # [T, vocab]
    want = torch.nn.functional.cross_entropy(logits[8:15], ids[9:16])
    torch.testing.assert_close(kept, want)
    torch.testing.assert_close(full, want)


@pytest.mark.parametrize("task", [False, True])
def test_head_in_chunks_gives_the_plain_gradient(monkeypatch, task):
    """backward_sample runs the LM head + loss a few positions at a time: the same G as one plain
    loss.backward() (to float32 rounding), on text windows and on answer-only task samples."""
    from torch import nn

    from tacq_lite.algo import gradients

    class Plain(nn.Module):  # the same decoder, but no .lm_head: the plain path
        def __init__(self, inner):
            super().__init__()
            self.inner, self.model = inner, inner.model

        def forward(self, **kw):
            return self.inner(**kw)

    monkeypatch.setattr(gradients, "HEAD_CHUNK", 5)  # several chunks, the last one short
    model = tiny_llama(layers=2)
    x = windows(n=3)
    samples = [(w, torch.arange(w.numel()) >= 5) for w in x] if task else x
    assert gradients._chunkable_head(model) is not None and gradients._chunkable_head(Plain(model)) is None
    chunked = accumulate_gradients(model, samples, squares=True, progress=False)
    plain = accumulate_gradients(Plain(model), samples, squares=True, progress=False)
    assert (chunked.n_tokens, chunked.n_samples) == (plain.n_tokens, plain.n_samples)
    for name, g in plain.G.items():
        torch.testing.assert_close(chunked.G[name], g, rtol=1e-5, atol=1e-8)
        # g² doubles g's relative rounding error, and an element near zero has no relative accuracy to
        # speak of: the absolute tolerance is a millionth of the largest square (about 10 float32 ulps of it).
        # On an AVX-512 CPU the chunked head's rounding put one small element 2.7e-5 apart, relatively.
        scale = plain.G2[name].abs().max().item()
        torch.testing.assert_close(chunked.G2[name], plain.G2[name], rtol=1e-5, atol=1e-6 * scale)
