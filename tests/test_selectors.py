"""Tests for tacq_lite.algo.selectors: every selector against its formula on hand-made numbers."""
import pytest
import torch

from tacq_lite.algo import select, selectors

W = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 4.0, 0.0]])  # [rows=2, cols=3]
QW = torch.tensor([[1.5, -2.0, 0.0], [-2.0, 3.5, 0.25]])  # error QW − W: [[.5, 0, -.5], [1, -.5, .25]]
G = torch.tensor([[2.0, 1.0, 4.0], [0.5, 3.0, 1.0]])  # Σ|g| >= 0
G2 = torch.tensor([[1.0, 0.5, 8.0], [0.25, 4.0, 2.0]])
H_diag = torch.tensor([4.0, 1.0, 9.0])  # [cols]
Hinv_diag = torch.tensor([0.5, 2.0, 0.25])  # [cols]
ALL = dict(W=W, G=G, G2=G2, QW=QW, H_diag=H_diag, Hinv_diag=Hinv_diag)


def expected(name, i, j):
    """The formula for entry (i, j), written out with Python floats."""
    w, q, g, g2 = W[i, j].item(), QW[i, j].item(), G[i, j].item(), G2[i, j].item()
    e = q - w
    return {
        "tacq": abs(w) * abs(g) * abs(e),
        "magnitude": abs(w),
        "gradient": abs(g),
        "qal": abs(g) * abs(e),
        "msg": abs(w) * abs(g),
        "fisher": g2 * e * e,
        "hessian": e * e / Hinv_diag[j].item(),
        "activation": abs(w) * H_diag[j].item() ** 0.5,
        "owq_columns": H_diag[j].item() * sum((QW[r, j] - W[r, j]).item() ** 2 for r in range(2)) / 2,
    }[name]


@pytest.mark.parametrize("name", [n for n in selectors.SELECTORS if n != "random"])
def test_each_selector_matches_its_formula(name):
    s = selectors.score(name, **ALL)
    assert s.shape == W.shape and s.dtype == torch.float32
    want = torch.tensor([[expected(name, i, j) for j in range(3)] for i in range(2)])
    assert torch.allclose(s, want), (name, s, want)
    # Only the declared inputs are read: passing just those gives the same score.
    given = {k: ALL[k] for k in selectors.SELECTORS[name].needs}
    assert torch.equal(selectors.score(name, W=W, **given), s)


def test_hand_checked_values():
    # A few entries by hand, independent of the helper above.
    assert selectors.score("tacq", **ALL)[1, 0].item() == 3.0 * 0.5 * 1.0
    assert selectors.score("tacq", **ALL)[0, 1].item() == 0.0  # no quantization error, no score
    assert selectors.score("hessian", **ALL)[0, 2].item() == 0.25 / 0.25
    assert selectors.score("owq_columns", **ALL)[:, 0].tolist() == [4.0 * 1.25 / 2] * 2


def test_random_is_seeded_and_uniform():
    a = selectors.score("random", W=W, generator=torch.Generator().manual_seed(3))
    b = selectors.score("random", W=W, generator=torch.Generator().manual_seed(3))
    c = selectors.score("random", W=W, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a < 1)).all()


def test_needs_are_declared():
    assert selectors.needs_gradients("tacq") and selectors.needs_gradients("fisher") and selectors.needs_gradients("msg")
    for name in ("magnitude", "random", "hessian", "activation", "owq_columns"):
        assert not selectors.needs_gradients(name)
    assert selectors.SELECTORS["owq_columns"].columns
    assert sum(s.columns for s in selectors.SELECTORS.values()) == 1
    assert all(s.needs <= set(selectors.INPUTS) for s in selectors.SELECTORS.values())


def test_bad_calls():
    with pytest.raises(ValueError, match="unknown; choose one of tacq, magnitude"):
        selectors.score("salience", W=W)
    with pytest.raises(ValueError, match="needs G, QW"):
        selectors.score("tacq", W=W)
    with pytest.raises(ValueError, match="shape"):
        selectors.score("gradient", W=W, G=G[:, :2])
    with pytest.raises(ValueError, match="shape"):
        selectors.score("activation", W=W, H_diag=H_diag[:2])


@pytest.mark.parametrize("name", [n for n in selectors.SELECTORS if n != "random"])
def test_a_nan_score_never_reaches_a_mask(name):
    # A NaN in any input (e.g. a diverged backward pass) makes a NaN score; the selection step
    # of every selector, weight-wise or column-wise, refuses it and names the linear.
    bad = {k: v.clone() for k, v in ALL.items()}
    for v in bad.values():
        v.view(-1)[0] = float("nan")
    linear = "model.layers.0.mlp.up_proj"
    s = {linear: selectors.score(name, **bad), "model.layers.0.mlp.down_proj": selectors.score(name, **ALL)}
    with pytest.raises(ValueError, match=r"scores of model\.layers\.0\.mlp\.up_proj must be finite"):
        if selectors.SELECTORS[name].columns:
            select.select_columns({n: v[0] for n, v in s.items()}, shapes={n: (2, 3) for n in s}, ratio=0.3)
        else:
            select.select_topk(s, ratio=0.3)
