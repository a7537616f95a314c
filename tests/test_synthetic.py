from pathlib import Path

import pytest
import torch
from fakes import BigramLM, FakeTok

from tacq_lite.data import synthetic
from tacq_lite.data.calibration import calibration_pairs
from tacq_lite.data.synthetic import N_EVAL, SHOTS, TASKS, synthetic_prefix, synthetic_samples
from tacq_lite.eval.synthetic import is_stop, synthetic_eval

DATA = Path(__file__).resolve().parents[1] / "data" / "synthetic"


def test_committed_files_match_the_generator(tmp_path):
    written = synthetic.write_jsonl(tmp_path)
    assert {p.name for p in written} == {p.name for p in DATA.glob("*.jsonl")}
    for path in written:
        assert path.read_text() == (DATA / path.name).read_text(), f"regenerate {path.name}"


@pytest.mark.parametrize("name", list(TASKS))
def test_eval_and_calibration_items_are_disjoint(name):
    prefix = synthetic_prefix(name)
    eval_items, calib_items = synthetic_samples(name), synthetic_samples(name, split="calib")
    assert len(eval_items) == N_EVAL and 20 <= len(calib_items) <= 50
    queries = [s.prompt[len(prefix):] for s in eval_items + calib_items]
    assert all(s.prompt.startswith(prefix) for s in eval_items + calib_items)
    assert len(set(queries)) == len(queries)
    shots = prefix.splitlines()
    assert len(shots) == SHOTS
    assert not {s.prompt.splitlines()[-1] + s.answer for s in eval_items + calib_items} & set(shots)
    choices = TASKS[name].choices
    if choices:
        assert {s.answer for s in eval_items} == set(choices)


def test_choice_tasks_pick_the_likelier_option():
    tok = FakeTok()
    table = torch.zeros(64, 64)
    table[:, tok.id(" are")] = 5.0  # the model always prefers " are"
    result = synthetic_eval(BigramLM(table), tok, tasks="agreement", limit=10, progress=False)
    plural = sum(s.answer == " are" for s in synthetic_samples("agreement")[:10])
    assert result.accuracy["agreement"] == pytest.approx(plural / 10)
    assert result.n == {"agreement": 10} and result.chance == {"agreement": 0.5}
    # Per item: which were right (the plural ones) and each answer's NLL, averaging to the task's.
    assert result.item_right["agreement"] == [s.answer == " are" for s in synthetic_samples("agreement")[:10]]
    assert sum(result.item_nll["agreement"]) / 10 == pytest.approx(result.nll["agreement"])


def test_open_tasks_need_the_exact_answer_then_a_newline():
    tok = FakeTok(vocab=128)
    table = torch.zeros(128, 128)
    table[:, tok.id("\n")] = 5.0  # the model ends every line at once: never the answer
    result = synthetic_eval(BigramLM(table), tok, tasks=["add"], limit=5, progress=False)
    assert result.accuracy == {"add": 0.0} and result.nll["add"] > 0
    assert is_stop(tok, tok.id("\n")) and is_stop(tok, tok.eos_token_id)
    assert not is_stop(tok, tok.id(" 7"))


def test_bad_arguments_are_refused():
    tok, model = FakeTok(), BigramLM(torch.zeros(64, 64))
    with pytest.raises(ValueError, match="Unknown synthetic task 'nope'; choose one of: copy"):
        synthetic_eval(model, tok, tasks=["nope"])
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        synthetic_eval(model, tok, limit=0)
    with pytest.raises(ValueError, match="split"):
        synthetic_samples("copy", split="test")


def test_synthetic_calibration_pairs_come_from_the_calib_split():
    pairs = calibration_pairs("synthetic:add", n=5, seed=0)
    assert len(pairs) == 5 and set(pairs) <= set(synthetic_samples("add", split="calib"))
    assert not set(pairs) & set(synthetic_samples("add"))


@pytest.mark.slow  # ~40 forward passes of the 135M model; minutes on a busy 2-core CPU
def test_embedded_model_is_well_above_chance(embedded_gguf):
    from tacq_lite.model.loading import load_model

    model, tok = load_model()
    result = synthetic_eval(model, tok, tasks=["copy", "count", "agreement"], limit=10, progress=False)
    for name, acc in result.accuracy.items():
        assert acc >= result.chance[name] + 0.3, result.table()
