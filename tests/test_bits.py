import pytest

from tacq_lite.core.bits import average_bits


def test_per_channel_hand_computed():
    # 3 bits + (16 + 16) / 576 per weight
    r = average_bits({"a": (10, 576)}, bits=3)
    assert r.avg_bits == pytest.approx(3 + 32 / 576)
    assert r.n_weights == 5760


def test_groups_and_kept_weights():
    shapes = {"a": (4, 64), "b": (8, 128)}
    r = average_bits(shapes, bits=2, groupsize=64, n_kept={"a": 2, "b": 6})
    n = 4 * 64 + 8 * 128
    expect = (n * (2 + 32 / 64) + 8 * 32) / n
    assert r.avg_bits == pytest.approx(expect)
    assert r.n_kept == 8


def test_paper_budget_is_about_3_1_bits():
    # 0.35 % kept at 32 bits each adds 0.112 bits (TaCQ's "3.1 bits")
    r = average_bits({"a": (1000, 1000)}, bits=3, n_kept={"a": 3500}, scale_bits=0, zero_bits=0)
    assert r.avg_bits == pytest.approx(3.112)


def test_bad_inputs():
    with pytest.raises(ValueError, match="does not divide"):
        average_bits({"a": (4, 576)}, bits=3, groupsize=128)
    with pytest.raises(KeyError):
        average_bits({"a": (4, 64)}, bits=3, n_kept={"b": 1})
    with pytest.raises(ValueError, match="kept count"):
        average_bits({"a": (4, 64)}, bits=3, n_kept={"a": 1000})
