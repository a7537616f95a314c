import math

import pytest
import torch

from tacq_lite.data import calibration, corpus
from tacq_lite.eval.lm import evaluate_lm
from tacq_lite.model.loading import tiny_llama


class CharTok:
    """A byte-level stand-in for a tokenizer (ids < 256)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return str(path)


def test_calibration_windows_seeded_and_shaped(text_file):
    tok = CharTok()
    a = corpus.calibration_windows(tok, text_file, n=4, seq_len=32, seed=1)
    b = corpus.calibration_windows(tok, text_file, n=4, seq_len=32, seed=1)
    c = corpus.calibration_windows(tok, text_file, n=4, seq_len=32, seed=2)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_eval_tokens_whole_windows(text_file):
    t = corpus.eval_tokens(CharTok(), text_file, max_tokens=100, seq_len=32)
    assert t.numel() == 96


def test_wikitext2_halves_are_disjoint():
    if corpus.shared_data_dir() is None:
        pytest.skip("../shared/data is absent: the WikiText-2 split needs the reference copy")
    calib = corpus.source_text("wikitext2", role="calib")
    evaluation = corpus.source_text("wikitext2", role="eval")
    assert len(calib) > 500_000 and len(evaluation) > 500_000
    raw = (corpus.shared_data_dir() / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert calib + evaluation == raw  # one cut, nothing shared, nothing lost
    assert "first half" in corpus.describe_source("wikitext2")


def test_bad_sources(tmp_path, monkeypatch):
    tok = CharTok()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus.eval_tokens(tok, str(tmp_path / "missing.txt"), seq_len=8)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        corpus.eval_tokens(tok, str(empty), seq_len=8)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="fewer than one window"):
        corpus.calibration_windows(tok, str(short), n=1, seq_len=64)


def test_non_utf8_text_and_jsonl_name_the_file(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 ".encode("latin-1") * 3000)  # the bad byte first, the file longer than one read chunk
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 3\); convert it"):
        corpus.eval_tokens(CharTok(), str(text), seq_len=8)
    late = tmp_path / "late.txt"
    late.write_bytes(b"a" * 10000 + b"\xff")
    with pytest.raises(ValueError, match=r"late\.txt is not UTF-8 text \(byte 0xff at offset 10000\)"):
        corpus.calibration_windows(CharTok(), str(late), n=1, seq_len=8)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"prompt": "p", "answer": "a"}\n{"prompt": "\xe9", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl is not UTF-8 text \(byte 0xe9 at offset 43\)"):
        calibration.calibration_pairs(str(pairs), n=1)
    pairs.write_text('{"prompt": "p", "answer": "a"}\n\n{"prompt": "p", "answer": \n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl, line 3: not valid JSON"):
        calibration.calibration_pairs(str(pairs), n=1)
    pairs.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p\u2028q"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl, line 2: missing string field\(s\) \['answer'\]"):
        calibration.calibration_pairs(str(pairs), n=1)


def test_no_wikitext_source_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TACQ_LITE_DATA", str(tmp_path / "nowhere"))
    corpus._wikitext2_halves.cache_clear()
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    try:
        with pytest.raises(FileNotFoundError, match="shared/data.*load_dataset"):
            corpus.source_text("wikitext2", role="calib")
    finally:
        corpus._wikitext2_halves.cache_clear()


def test_perplexity_matches_manual_nll_and_kl_is_zero_to_itself():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0))
    m = evaluate_lm(model, tokens, seq_len=32, reference=model, progress=False)
    logits = model(tokens.view(2, 32)).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens.view(2, 32)[:, 1:].reshape(-1))
    assert m.nll == pytest.approx(nll.item(), rel=1e-5)
    assert m.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert m.n_tokens == 62 and abs(m.kl) < 1e-6 and m.ref_ppl == pytest.approx(m.ppl)
    other = tiny_llama(seed=1)
    assert evaluate_lm(other, tokens, seq_len=32, reference=model, progress=False).kl > 1e-3


def test_perplexity_of_a_text_equals_a_plain_computation(text_file):
    """From a text file to one number: tacq_lite's stream + windows + evaluate_lm against the text's
    bytes cut by hand and exp(mean(logsumexp(z) - z[next])) in float64, position by position."""
    seq_len = 48
    model = tiny_llama()
    m = evaluate_lm(model, corpus.eval_tokens(CharTok(), text_file, seq_len=seq_len), seq_len=seq_len,
                    progress=False)
    data = open(text_file, "rb").read()
    nll = []
    with torch.no_grad():
        for start in range(0, len(data) - seq_len + 1, seq_len):
            ids = list(data[start:start + seq_len])
            z = model(torch.tensor([ids])).logits[0].double()  # [seq_len, vocab]
            nll += [(torch.logsumexp(z[t], 0) - z[t, ids[t + 1]]).item() for t in range(seq_len - 1)]
    assert m.n_tokens == len(nll) == (len(data) // seq_len) * (seq_len - 1)
    assert m.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_perplexity_comes_with_a_window_bootstrap_interval():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (8 * 32,), generator=torch.Generator().manual_seed(2))
    m = evaluate_lm(model, tokens, seq_len=32, progress=False)
    assert m.n_windows == 8 and len(m.window_nll) == 8 and m.n_tokens == 8 * 31
    assert m.nll == pytest.approx(sum(m.window_nll) / 8, rel=1e-9)
    assert min(m.window_nll) < max(m.window_nll)  # windows differ, so the interval has width
    assert m.ppl_low < m.ppl < m.ppl_high
    assert math.exp(min(m.window_nll)) <= m.ppl_low and m.ppl_high <= math.exp(max(m.window_nll))
    again = evaluate_lm(model, tokens, seq_len=32, progress=False)
    assert (again.ppl_low, again.ppl_high) == (m.ppl_low, m.ppl_high)  # seeded: reproducible
    one = evaluate_lm(model, tokens[:32], seq_len=32, progress=False)
    assert one.n_windows == 1 and one.ppl_low is None and one.ppl_high is None


def test_bootstrap_interval_matches_the_normal_approximation():
    """For 400 draws the percentile bootstrap of the mean is close to mean ± 1.96·sd/√n."""
    from tacq_lite.eval.lm import bootstrap_interval, format_ppl

    values = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3 + 3.0
    low, high = bootstrap_interval(values)
    half = 1.96 * values.std().item() / 20
    assert low < values.mean().item() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_interval(torch.full((5,), 2.0, dtype=torch.float64)) == (2.0, 2.0)
    assert bootstrap_interval(values[:1]) is None
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_interval(values.view(20, 20))
    text = format_ppl({"ppl": 42.081, "ppl_low": 40.5, "ppl_high": 44.0, "n_tokens": 64 * 511, "n_windows": 64})
    assert text == "42.08 [40.50, 44.00] (64 × 511 tok)"
