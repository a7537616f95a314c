import pytest
from fakes import CHAT_TEMPLATE, ChatSpyTok, tiny_data, word_tokenizer  # noqa: F401 (fixture)

from tacq_lite.data.tokens import encode, prompt_ids, use_chat_template

PROMPT = "the capital of France is"


def test_a_prompt_goes_through_the_chat_template_where_the_tokenizer_has_one():
    tok = word_tokenizer(CHAT_TEMPLATE)
    ids = prompt_ids(tok, PROMPT)  # None: automatic
    turn = [{"role": "user", "content": PROMPT}]
    assert ids == list(tok.apply_chat_template(turn, add_generation_prompt=True, return_dict=True)["input_ids"])
    # the same ids from the rendered text written out by hand: a user turn, then the assistant's header
    assert ids == encode(tok, "user : the capital of France is ; assistant :")
    assert prompt_ids(tok, PROMPT, chat_template=True) == ids
    assert prompt_ids(tok, PROMPT, chat_template=False) == encode(tok, PROMPT, special=True) != ids
    assert use_chat_template(tok) is True and use_chat_template(tok, False) is False


def test_without_a_chat_template_a_prompt_is_plain_text():
    tok = word_tokenizer()
    assert prompt_ids(tok, PROMPT) == encode(tok, PROMPT, special=True)
    assert use_chat_template(tok) is False
    with pytest.raises(ValueError, match="no chat template; pass --no-chat-template"):
        prompt_ids(tok, PROMPT, chat_template=True)


@pytest.mark.usefixtures("tiny_data")  # MMLU and GSM8K files in a temporary data folder
def test_the_paper_protocols_never_use_the_chat_template(tmp_path):
    """MMLU, GSM8K (with generation), the synthetic suite and perplexity keep their plain few-shot
    prompts even when the chat template is asked for: the spy tokenizer fails on any use of it."""
    from tacq_lite.config import QuantConfig
    from tacq_lite.model.loading import tiny_llama
    from tacq_lite.run import experiment

    tok = ChatSpyTok(vocab=256)
    for piece in ("<eos>", " A", " B", " C", " D"):
        tok.id(piece)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log . " * 20)
    cfg = QuantConfig(evals=("mmlu", "gsm8k", "synthetic", str(text)), chat_template=True, mmlu_limit=2,
                      mmlu_subjects=("astronomy",), gsm8k_limit=2, gsm8k_max_new_tokens=4, synthetic_limit=1,
                      seq_len=16, eval_tokens=64)
    metrics, _ = experiment.run_evals(tiny_llama(vocab=256), tok, cfg, progress=False)
    assert set(metrics) == {"mmlu", "gsm8k", "synthetic", str(text)}
    assert metrics["gsm8k"]["accuracy"] is not None  # generation ran, from the plain prompt
