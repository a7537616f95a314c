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
