"""The notebooks' parameter checks and the course's one colour per method."""
import pytest

from tacq_lite.algo.selectors import SELECTORS
from tacq_lite.config import METHODS
from tacq_lite.course.explore import METHOD_COLORS, method_color
from tacq_lite.course.params import check_choice, check_choices


def test_known_value_passes():
    check_choice("quantizer", "gptq", ("rtn", "gptq"))
    check_choices("selectors", ["tacq", "random"], SELECTORS)


@pytest.mark.parametrize("value, fix", [
    ('"gptq"', "without the inner quotes"),  # -p quantizer '"gptq"'
    ("gtpq", "not one of"),
    ("[3, 2]", "-y"),
])
def test_unknown_string_raises_with_the_fix(value, fix):
    with pytest.raises(ValueError, match=fix):
        check_choice("quantizer", value, ("rtn", "gptq"))


def test_list_given_as_text_raises():
    with pytest.raises(ValueError, match="-y"):
        check_choices("selectors", "[tacq, random]", SELECTORS)
    with pytest.raises(ValueError, match="'tcq'"):
        check_choices("selectors", ["tacq", "tcq"], SELECTORS)


def test_every_method_and_selector_has_its_own_colour():
    for name in (*METHODS, *SELECTORS):
        assert name in METHOD_COLORS
    selector_colours = [METHOD_COLORS[s] for s in SELECTORS]
    assert len(set(selector_colours)) == len(selector_colours)  # no two selectors share a colour


def test_method_color_of_a_variant_and_an_unknown_name():
    assert method_color("TaCQ task") == method_color("tacq") == METHOD_COLORS["tacq"]
    assert method_color("owq_columns") == METHOD_COLORS["owq_columns"]
    with pytest.raises(KeyError, match="METHOD_COLORS"):
        method_color("squeezellm")


def test_baseline_reprint_equals_a_direct_evaluation(capsys):
    from tacq_lite.course import baseline
    from tacq_lite.data import corpus
    from tacq_lite.eval.lm import evaluate_lm
    from tacq_lite.model.loading import tiny_llama

    if corpus.shared_data_dir() is None:
        pytest.skip("../shared/data is absent: the baseline is measured on its WikiText-2 copy")

    class ByteTok:
        def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
            return {"input_ids": list(text.encode("utf-8"))}

    model, tok = tiny_llama(seed=0), ByteTok()
    tokens = corpus.eval_tokens(tok, "wikitext2", max_tokens=2048, seq_len=512)
    direct = evaluate_lm(model, tokens, seq_len=512, progress=False)
    here = evaluate_lm(model, tokens[:1024], seq_len=128, progress=False)
    base = baseline.print_baseline(model, tok, here=here, here_seq_len=128)
    assert base.window_nll == direct.window_nll and base.n_windows == 4
    out = capsys.readouterr().out
    assert "4 windows × 512 tokens = 2048 tokens, 2044 predicted" in out
    assert "8 windows × 128 tokens" in out and "shorter windows" in out
    with pytest.raises(ValueError, match="here_seq_len"):
        baseline.print_baseline(model, tok, here=here)


def test_plot_rtn_labels_its_figure():
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from tacq_lite.course.explore import plot_rtn

    ax = plot_rtn(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), bits=3)
    assert ax.get_xlabel() and ax.get_ylabel() and "3-bit RTN" in ax.get_title()
