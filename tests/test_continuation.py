import math

import pytest
import torch
from fakes import CHAT_TEMPLATE, BigramLM, FakeTok, ScriptLM, word_tokenizer

from tacq_lite.data.tokens import encode, prompt_ids, split_ids
from tacq_lite.eval.continuation import PrefixCache, answer_nll, greedy_generate, score_continuation, truncate_left
from tacq_lite.model.loading import tiny_llama


def test_split_ids_marks_where_the_answer_starts():
    tok = FakeTok()
    ids, start = split_ids(tok, "Answer:", " yes no")
    assert tok.decode(ids[start:]) == " yes no"
    assert tok.decode(ids[:start]) == "Answer:"


def test_answer_nll_matches_hand_computed_bigram_probabilities():
    torch.manual_seed(0)
    tok, table = FakeTok(), torch.randn(64, 64)
    a, colon, yes, no = (tok.id(p) for p in ("Answer", ":", " yes", " no"))
    model = BigramLM(table)

    def logp(prev: int, nxt: int) -> float:  # float64 re-derivation of log softmax
        row = table[prev].double()
        return float(row[nxt] - torch.logsumexp(row, 0))

    expected = -(logp(colon, yes) + logp(yes, no)) / 2
    assert answer_nll(model, tok, "Answer:", " yes no") == pytest.approx(expected, abs=1e-5)
    score = score_continuation(model, tok, "Answer:", " yes no")
    assert score.greedy.tolist() == [int(table[colon].argmax()) == yes, int(table[yes].argmax()) == no]
    assert score.next_token == int(table[no].argmax())


def test_prompts_are_truncated_from_the_left():
    tok, model = FakeTok(), BigramLM(torch.zeros(64, 64), max_positions=6)
    long_prompt = " ".join(f"w{i}" for i in range(20)) + ":"
    nll = answer_nll(model, tok, long_prompt, " yes")
    assert max(model.seen_lengths) <= 6
    assert nll == pytest.approx(math.log(64), abs=1e-5)  # uniform logits
    greedy_generate(model, tok, long_prompt, max_new_tokens=2)
    assert max(model.seen_lengths) <= 6


def test_truncate_left_refuses_to_cut_into_the_answer():
    assert truncate_left(list(range(10)), 7, 5) == ([5, 6, 7, 8, 9], 2)
    with pytest.raises(ValueError, match="does not fit"):
        truncate_left(list(range(10)), 7, 2)


def test_greedy_generate_stops_at_the_first_stop_string():
    tok = FakeTok()
    prompt = "Question: two plus two?\nAnswer:"
    script = encode(tok, " It is 4.\n\nQuestion: next")
    model = ScriptLM(script, prompt_len=len(encode(tok, prompt)))
    text = greedy_generate(model, tok, prompt, max_new_tokens=50, stop_strings=("\n\nQuestion:", "Question:"))
    assert text == " It is 4."
    assert greedy_generate(model, tok, prompt, max_new_tokens=2) == " It is"
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tok, prompt, max_new_tokens=0)


def test_greedy_generate_asks_through_the_chat_template_only_when_told():
    """Off by default (the few-shot protocols); None = where the tokenizer has one, as `eval --prompt`."""
    tok, prompt = word_tokenizer(CHAT_TEMPLATE), "the capital of France is"
    table = torch.zeros(len(tok), len(tok))  # [vocab, vocab]
    table[:, tok.convert_tokens_to_ids("Paris")] = 1.0  # every next token is "Paris"
    model = BigramLM(table)
    seen = []  # input ids of each forward pass; the first is the prompt
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    assert greedy_generate(model, tok, prompt, max_new_tokens=1) == "Paris"
    assert seen[0] == encode(tok, prompt, special=True)
    for chat in (None, True):
        seen.clear()
        assert greedy_generate(model, tok, prompt, max_new_tokens=1, chat_template=chat) == "Paris"
        assert seen[0] == prompt_ids(tok, prompt) != encode(tok, prompt, special=True)


def test_prefix_cache_gives_the_same_scores_and_generations_as_a_full_pass():
    tok, model = FakeTok(vocab=256), tiny_llama(vocab=256)
    prefix = "a b c d: e\nf g h: i\n"
    cache = PrefixCache(model, encode(tok, prefix))
    assert cache.past is not None
    for question, answer in [("j k:", " l m"), ("n:", " o"), ("p q r:", " s")]:
        plain = score_continuation(model, tok, prefix + question, answer)
        cached = score_continuation(model, tok, prefix + question, answer, cache=cache)
        torch.testing.assert_close(cached.token_nll, plain.token_nll, atol=1e-5, rtol=1e-5)
        assert cached.next_token == plain.next_token
        assert (greedy_generate(model, tok, prefix + question, max_new_tokens=4, cache=cache)
                == greedy_generate(model, tok, prefix + question, max_new_tokens=4))
    assert cache.past.get_seq_length() == cache.valid  # runs never leave tokens behind


def test_prefix_cache_passes_the_cache_by_the_keyword_the_model_takes():
    """Newer transformers renamed past_key_values to `cache` and warn on every call that uses the
    old name; the evaluators call the model once per token, so they must use the one it takes."""
    import inspect
    import warnings

    tok, model = FakeTok(vocab=256), tiny_llama(vocab=256)
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = PrefixCache(model, encode(tok, "a b c: d\n"))
        greedy_generate(model, tok, "a b c: d\ne f:", max_new_tokens=3, cache=cache)
    assert cache.keyword == ("cache" if takes_cache else "past_key_values")
    assert cache.past is not None and cache.past.get_seq_length() == cache.valid
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert PrefixCache(BigramLM(torch.zeros(64, 64))).keyword == "past_key_values"  # a forward(**kwargs): the old name
