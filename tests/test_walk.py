import pytest
import torch
from torch import nn

from tacq_lite import walk
from tacq_lite.models import tiny_llama


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
