import pytest
import torch
from torch import nn

from tacq_lite.model import walk
from tacq_lite.model.loading import tiny_llama


def test_named_linears_cover_attention_and_mlp():
    model = tiny_llama(layers=3)
    names = walk.named_linears(model)
    assert len(names) == 3 * 7
    assert "model.layers.2.mlp.down_proj" in names
    assert all(isinstance(m, nn.Linear) for m in names.values())
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_apply_to_linears_changes_only_targets():
    model = tiny_llama()
    head = model.lm_head.weight.clone()
    walk.apply_to_linears(model, lambda _n, W: torch.zeros_like(W))
    assert all(m.weight.abs().sum() == 0 for m in walk.named_linears(model).values())
    assert torch.equal(model.lm_head.weight, head)
    with pytest.raises(ValueError, match="shape"):
        walk.apply_to_linears(model, lambda _n, W: W[:1])


def test_conv1d_models_are_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="Conv1D"):
        walk.named_linears(gpt2)


def test_sequential_pass_sees_every_linear_in_order_and_reproduces_outputs():
    model = tiny_llama(layers=2)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    seen, counts = [], {}

    class Count:
        def __init__(self, name):
            self.name, self.n = name, 0

        def add_batch(self, x):
            self.n += x.shape[0] * x.shape[1]

    def finish(name, linear, stats):
        seen.append(name)
        counts[name] = stats.n

    walk.sequential_pass(model, windows, make_stats=lambda n, _l: Count(n), finish=finish, progress=False)
    assert seen == list(walk.named_linears(model))  # true-sequential order
    assert set(counts.values()) == {3 * 16}  # each linear saw every calibration token once

    # Layer-by-layer with captured kwargs gives the same hidden states as the full model.
    inps, kwargs = walk.capture_layer0_inputs(model, windows)
    x = inps[0]
    for layer in walk.decoder_layers(model):
        x = layer(x, **kwargs)
        x = x[0] if isinstance(x, tuple) else x
    full = model(windows[:1], output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(model.model.norm(x), full, atol=1e-5)


def _gptq_pass(model, windows, **kw):
    from tacq_lite.algo.gptq import GPTQ

    inputs = {}

    class Recording(GPTQ):
        def __init__(self, name, linear):
            super().__init__(linear)
            self.name = name

        def add_batch(self, x):
            inputs.setdefault(self.name, []).append(x.clone())
            super().add_batch(x)

        def copy_stats_from(self, other):  # the staged pass feeds k/v and up through q and gate
            inputs[self.name] = inputs[other.name]
            super().copy_stats_from(other)

    hessians = {}

    def finish(name, linear, stats):
        hessians[name] = stats.H.clone()
        linear.weight.data.copy_(stats.quantize(bits=3, mse=False).W_hat)

    walk.sequential_pass(model, windows, make_stats=Recording, finish=finish, progress=False, **kw)
    return inputs, hessians


def test_staged_pass_sees_the_same_inputs_as_the_generic_pass():
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    generic_model, staged_model = tiny_llama(layers=2), tiny_llama(layers=2)
    generic, generic_H = _gptq_pass(generic_model, windows, staged=False)
    staged, staged_H = _gptq_pass(staged_model, windows, staged=True)
    for name in generic_H:  # k/v and up copied q's and gate's Hessian: the one their inputs give
        assert torch.allclose(staged_H[name], generic_H[name], rtol=1e-5, atol=1e-7), name
    assert list(staged) == list(generic) == list(walk.named_linears(generic_model))
    for name in generic:  # each linear's inputs come after the earlier linears were quantized
        assert len(staged[name]) == 3
        for a, b in zip(staged[name], generic[name]):
            assert torch.allclose(a, b, atol=1e-6), name
    for a, b in zip(staged_model.parameters(), generic_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_layer_off_the_llama_layout_is_walked_the_generic_way():
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    models = [tiny_llama(layers=2), tiny_llama(layers=2)]
    for model in models:  # a residual layout _staged_layer does not know: half the layer's output
        for layer in walk.decoder_layers(model):
            own = layer.forward
            layer.forward = lambda *a, own=own, **k: own(*a, **k) * 0.5
    inps, kwargs = walk.capture_layer0_inputs(models[0], windows)
    assert not walk._can_stage(walk.decoder_layers(models[0])[0], inps[0], kwargs)
    auto, _ = _gptq_pass(models[0], windows)
    generic, _ = _gptq_pass(models[1], windows, staged=False)
    for name in generic:
        for a, b in zip(auto[name], generic[name]):
            assert torch.equal(a, b), name
    model = tiny_llama(layers=1)
    layer = walk.decoder_layers(model)[0]
    own = layer.forward
    layer.forward = lambda *a, **k: own(*a, **k) * 0.5
    with pytest.raises(NotImplementedError, match="Llama layout"):
        _gptq_pass(model, windows, staged=True)


def test_staging_is_checked_once_per_kind_of_layer(monkeypatch):
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    checked, staged = [], []
    can_stage, staged_layer = walk._can_stage, walk._staged_layer
    monkeypatch.setattr(walk, "_can_stage", lambda layer, *a: checked.append(layer) or can_stage(layer, *a))
    def record(layer, inps, *a):  # the check stages one window; a real pass all of them
        if len(inps) == len(windows):
            staged.append(layer)
        return staged_layer(layer, inps, *a)

    monkeypatch.setattr(walk, "_staged_layer", record)
    model = tiny_llama(layers=3)
    layers = list(walk.decoder_layers(model))
    _gptq_pass(model, windows)
    assert checked == layers[:1] and staged == layers  # three layers of one class: one check
    checked.clear(), staged.clear()
    model = tiny_llama(layers=3)
    layers = list(walk.decoder_layers(model))
    own = layers[1].forward  # layer 1 alone gets another residual layout: it must not be staged
    layers[1].forward = lambda *a, **k: own(*a, **k) * 0.5
    _gptq_pass(model, windows)
    assert checked == layers[:2] and staged == [layers[0], layers[2]]
