import math

import pytest
import torch
from fakes import BigramLM, FakeTok, ScriptLM, tiny_data, write_csv  # noqa: F401 (fixture)

from tacq_lite.data import tasks
from tacq_lite.data.tokens import encode
from tacq_lite.eval.mmlu_gsm8k import extract_number, gsm8k_correct, gsm8k_eval, letter_token_ids, mmlu_eval


@pytest.mark.parametrize("text, number", [
    ("She pays 5 + 3 = 8 dollars.\n#### 42", "42"),
    ("#### 1,234", "1234"),
    ("So the answer is 17.", "17"),
    ("The answer is $1,250.50 in total, not 3", "1250.5"),
    ("#### -7", "-7"),
    ("It drops by -3.25 degrees", "-3.25"),
    ("The final answer is -$40.", "-40"),
    ("5 - 3 = 2", "2"),
    ("He has 12 apples and 3.0 pears", "3"),
    ("0.5 of 10 is 5.", "5"),
    ("The Answer Is 8 because 2*4 = 8 and 9", "8"),
    ("no digits here", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_gsm8k_scoring_compares_final_numbers_and_treats_no_number_as_wrong():
    assert gsm8k_correct("so 20 + 22 = 42. The answer is 42.", "... #### 42")
    assert gsm8k_correct("#### 1,000", "#### 1000")
    assert not gsm8k_correct("The answer is 41.", "#### 42")
    assert not gsm8k_correct("I do not know.", "#### 42")
    assert not gsm8k_correct("", "#### 42")


def letter_model(tok, scores, vocab=128):
    """A bigram model whose scores for " A".." D" after ":" are `scores` (and 0 elsewhere)."""
    table = torch.zeros(vocab, vocab)
    for letter, s in zip("ABCD", scores):
        table[tok.id(":"), tok.id(f" {letter}")] = s
    return BigramLM(table)


def test_letter_ids_follow_answer_colon():
    tok = FakeTok()
    assert letter_token_ids(tok) == [tok.id(" A"), tok.id(" B"), tok.id(" C"), tok.id(" D")]


def test_mmlu_scores_letters_in_order(tiny_data):
    answers = ["C", "C", "A", "D"]
    rows = [[f"q{i}?", "w", "x", "y", "z", a] for i, a in enumerate(answers)]
    write_csv(tiny_data / "mmlu" / "test" / "astronomy_test.csv", rows)
    tok = FakeTok(vocab=128)
    scores = [1.0, 2.0, 4.0, 3.0]  # after "Answer:" the model prefers " C", then " D"
    result = mmlu_eval(letter_model(tok, scores), tok, subjects=["astronomy"], progress=False)
    assert result.counts == {"astronomy": 4}
    assert result.subjects["astronomy"] == pytest.approx(0.5)  # the two C questions
    assert result.categories == {"STEM": pytest.approx(0.5)}
    assert result.overall == pytest.approx(0.5)
    logp = torch.log_softmax(torch.tensor(scores, dtype=torch.float64), 0)  # [4] in A, B, C, D order
    expected_nll = -sum(float(logp["ABCD".index(a)]) for a in answers) / len(answers)
    assert result.letter_nll == pytest.approx(expected_nll, abs=1e-5)
    assert result.item_right == [a == "C" for a in answers]  # per question, for bootstrap intervals
    assert sum(result.item_nll) / 4 == pytest.approx(expected_nll, abs=1e-5)
    prefers_a = mmlu_eval(letter_model(tok, [4.0, 1.0, 2.0, 3.0]), tok, subjects="astronomy", progress=False)
    assert prefers_a.overall == pytest.approx(0.25)
    assert mmlu_eval(letter_model(tok, scores), tok, subjects="astronomy", max_per_subject=1,
                     shots=0, split="val", progress=False).counts == {"astronomy": 1}


def test_mmlu_rejects_bad_arguments(tiny_data):
    tok = FakeTok(vocab=128)
    model = letter_model(tok, [0, 0, 0, 0])
    for kwargs, message in [({"max_per_subject": 0}, "max_per_subject"), ({"shots": 6}, "shots"),
                            ({"split": "dev"}, "split"), ({"subjects": ["astrology"]}, "Unknown MMLU subject")]:
        with pytest.raises(ValueError, match=message):
            mmlu_eval(model, tok, progress=False, **{"subjects": ["astronomy"], **kwargs})


def test_gsm8k_eval_without_a_number_is_wrong_not_a_crash(tiny_data):
    tok = FakeTok(vocab=256)
    table = torch.zeros(256, 256)
    table[:, 0] = 5.0  # always predicts end-of-sequence first
    result = gsm8k_eval(BigramLM(table), tok, limit=2, shots=2, max_new_tokens=4, progress=False)
    assert result.n == 2 and result.accuracy == 0.0
    assert [r.generation for r in result.records] == ["", ""]
    assert math.isfinite(result.nll) and result.nll > 0
    nll_only = gsm8k_eval(BigramLM(table), tok, limit=2, shots=2, generate=False, progress=False)
    assert nll_only.accuracy is None and nll_only.nll == pytest.approx(result.nll)


def test_gsm8k_eval_scores_a_scripted_right_answer(tiny_data):
    # test question 0 is "test 0 + 1?" with reference "#### 1".
    tok = FakeTok(vocab=256)
    prompt = tasks.gsm8k_prompt("test 0 + 1?", tasks.gsm8k_shots(1))
    script = encode(tok, " 0 + 1 = 1\nThe answer is 1.\n\nQuestion: more")
    result = gsm8k_eval(ScriptLM(script, len(encode(tok, prompt)), vocab=256), tok, limit=1, shots=1, progress=False)
    assert result.records[0].generation == " 0 + 1 = 1\nThe answer is 1."
    assert result.accuracy == 1.0


def test_gsm8k_eval_rejects_bad_limits(tiny_data):
    tok, model = FakeTok(), BigramLM(torch.zeros(64, 64))
    for kwargs in ({"limit": 0}, {"limit": -3}, {"limit": 1, "max_new_tokens": 0}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            gsm8k_eval(model, tok, progress=False, **kwargs)
    with pytest.raises(ValueError, match="train"):
        gsm8k_eval(model, tok, limit=1, split="train", progress=False)
