import pytest
import torch
from fakes import BigramLM, FakeTok, tiny_data  # noqa: F401  (tiny_data is a fixture)

from tacq_lite.config import QuantConfig
from tacq_lite.data import calibration
from tacq_lite.run import experiment


def test_names_that_mean_task_data():
    assert calibration.is_task_calibration("gsm8k") and calibration.is_task_calibration("mmlu")
    assert calibration.is_task_calibration("synthetic:add") and calibration.is_task_calibration("mine.jsonl")
    assert not calibration.is_task_calibration("wikitext2") and not calibration.is_task_calibration("notes.txt")


def test_gsm8k_calibration_scores_answers_only(tiny_data):
    tok = FakeTok(vocab=256)
    windows, samples = calibration.task_calibration(tok, "gsm8k", n=3, seq_len=16, seed=0)
    assert len(samples) == 3
    for ids, mask in samples:
        answer = tok.decode(ids[mask].tolist())
        assert answer.startswith(" ") and "####" in answer  # the reference solution, nothing of the question
        assert "Question" in tok.decode(ids[~mask].tolist())
    assert windows.dtype == torch.long and windows.shape[1] == 16 and 1 <= windows.shape[0] <= 3
    # The windows are the same pairs joined by EOS: the first window starts with the first sample.
    first = samples[0][0]
    assert torch.equal(windows.reshape(-1)[: min(16, first.numel())], first[:16])
    again, _ = calibration.task_calibration(tok, "gsm8k", n=3, seq_len=16, seed=0)
    assert torch.equal(again, windows)  # seeded


def test_user_jsonl_calibration_and_too_little_data(tmp_path):
    tok = FakeTok(vocab=256)
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "Two plus two is", "answer": " four"}\n{"prompt": "One plus one is", "answer": " two"}\n')
    windows, samples = calibration.task_calibration(tok, str(f), n=2, seq_len=4, seed=0)
    assert [tok.decode(ids[mask].tolist()) for ids, mask in samples] in ([" four", " two"], [" two", " four"])
    assert windows.shape == (2, 4)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration.task_calibration(tok, str(f), n=2, seq_len=64)


def test_run_evals_records_task_metrics(tiny_data):
    tok = FakeTok(vocab=256)
    for piece in ("<eos>", " A", " B", " C", " D"):
        tok.id(piece)
    model = BigramLM(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)))
    cfg = QuantConfig(evals=("gsm8k", "mmlu"), gsm8k_limit=2, gsm8k_generate=False, mmlu_limit=2,
                      mmlu_subjects=("astronomy",))
    metrics, seconds = experiment.run_evals(model, tok, cfg, progress=False, log=lambda *_: None)
    assert metrics["gsm8k"]["n"] == 2 and metrics["gsm8k"]["accuracy"] is None and metrics["gsm8k"]["nll"] > 0
    assert metrics["mmlu"]["n"] == 2 and 0 <= metrics["mmlu"]["accuracy"] <= 1
    assert set(seconds) == {"eval_gsm8k", "eval_mmlu"}
    text = experiment.format_table([{"method": "fp", "bits": 16, "avg_bits": 16.0, "seconds_total": 1.0,
                                     "metrics": metrics}])
    assert "gsm8k nll" in text and "mmlu acc" in text
