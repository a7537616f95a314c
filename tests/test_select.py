"""Tests for tacq_lite.algo.select (global top-k, ties, column selection, report) and run.score_cache."""
import warnings

import pytest
import torch

from tacq_lite.algo import select
from tacq_lite.algo.select import n_keep, select_columns, select_topk
from tacq_lite.run.score_cache import CacheWarning, load_cache, save_cache


def random_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (8, 16), "model.layers.0.mlp.down_proj": (16, 32),
              "model.layers.1.self_attn.q_proj": (8, 16)}
    return {n: torch.rand(s, generator=g) ** 4 for n, s in shapes.items()}  # skewed, like real scores


def test_n_keep_rounds_half_up_and_checks_bounds():
    assert n_keep(1000, 0.0035) == 4  # 3.5 -> 4
    assert n_keep(1000, 0.0034) == 3
    assert n_keep(1000, 0.0) == 0
    for bad in (-0.01, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            n_keep(1000, bad)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            select_topk(random_scores(), ratio=bad)


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.25, 0.999])
def test_topk_is_exactly_the_k_largest(ratio):
    s = random_scores()
    masks = select_topk(s, ratio=ratio)
    flat = torch.cat([v.flatten() for v in s.values()])  # [total]
    k = n_keep(flat.numel(), ratio)
    mine = torch.cat([m.flatten() for m in masks.values()])
    assert int(mine.sum()) == k
    want = torch.zeros_like(mine)
    want[flat.topk(k).indices] = True  # no ties in continuous random scores
    assert torch.equal(mine, want)
    assert all(m.dtype == torch.bool and m.shape == s[n].shape for n, m in masks.items())


def test_kth_largest_is_exact():
    s = list(random_scores().values())
    flat = torch.cat([v.flatten() for v in s]).sort(descending=True).values
    for k in (1, 7, 100, flat.numel()):
        assert select.kth_largest(s, k) == flat[k - 1].item()
    # A sample that misses the large values sets the bound too high: it is lowered until it holds.
    x = torch.ones(1000)
    x[::10] = 5.0  # exactly the entries a stride-10 sample sees
    t, cand = select._candidates(lambda: iter([x]), 1000, 150, sample_size=100)
    assert t == 1.0 and sum(len(i) for i, _ in cand) == 1000


@pytest.mark.parametrize("ratio", [0.0, 0.003, 0.05, 0.5])
def test_streaming_topk_equals_in_memory(ratio):
    """Scores made one linear at a time (and dropped) give select_topk's masks, ties included."""
    s = random_scores()
    s["model.layers.0.mlp.down_proj"] = (s["model.layers.0.mlp.down_proj"] * 4).round()  # many ties
    calls = []

    def score_of(name):
        calls.append(name)
        return s[name].clone()

    streamed = select.select_topk_streaming(score_of, {n: tuple(v.shape) for n, v in s.items()}, ratio=ratio)
    want = select_topk(s, ratio=ratio)
    assert all(torch.equal(streamed[n], want[n]) for n in s)
    assert ratio == 0 or calls[: len(s)] == list(s)  # one linear after the other, in order
    with pytest.raises(ValueError, match="finite"):
        select.select_topk_streaming(lambda n: torch.full(s[n].shape, float("nan")),
                                     {n: tuple(v.shape) for n, v in s.items()}, ratio=0.1)


def test_ties_are_broken_by_global_flat_index():
    s = {"a": torch.ones(2, 3), "b": torch.ones(4, 3)}  # 18 equal scores
    s["b"][3, 2] = 5.0  # one clear winner at the very end
    masks = select_topk(s, ratio=0.3)  # k = floor(5.4 + .5) = 5
    assert masks["b"][3, 2]
    assert masks["a"].flatten().tolist() == [True, True, True, True, False, False]  # then first in order
    assert int(masks["b"].sum()) == 1
    again = select_topk({n: v.clone() for n, v in s.items()}, ratio=0.3)
    assert all(torch.equal(masks[n], again[n]) for n in s)
    assert not any(m.any() for m in select_topk(s, ratio=0.0).values())


def test_bad_scores_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        select_topk({"a": torch.tensor([[1.0, float("nan")]])}, ratio=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        select_topk({"a": torch.tensor([[1.0, -1.0]])}, ratio=0.5)


def test_select_columns_takes_whole_columns_globally():
    shapes = {"x": (4, 5), "y": (2, 5)}  # 30 weights
    cols = {"x": torch.tensor([0.1, 3.0, 0.2, 1.0, 0.0]), "y": torch.tensor([2.0, 0.5, 0.0, 0.0, 3.0])}
    masks = select_columns(cols, shapes=shapes, ratio=0.35)  # k = floor(10.5 + .5) = 11
    # Order: x1 (3.0, tie with y4 -> lower index first; 4), y4 (6), y0 (8), x3 (would be 12 > 11): stop.
    assert masks["x"].all(0).tolist() == [False, True, False, False, False]
    assert masks["y"].all(0).tolist() == [True, False, False, False, True]
    for m in masks.values():
        assert torch.equal(m.any(0), m.all(0))  # every column is all-or-nothing
    big = select_columns(cols, shapes=shapes, ratio=0.4)  # k = 12: x3 now fits exactly
    assert big["x"].all(0).tolist() == [False, True, False, True, False]
    assert sum(int(m.sum()) for m in masks.values()) == 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_select_columns_refuses_bad_scores_and_names_the_linear(bad):
    shapes = {"model.layers.0.mlp.up_proj": (4, 5), "model.layers.0.mlp.down_proj": (5, 4)}
    cols = {"model.layers.0.mlp.up_proj": torch.tensor([0.1, 3.0, 0.2, 1.0, 0.0]),
            "model.layers.0.mlp.down_proj": torch.tensor([2.0, bad, 0.0, 0.0])}
    with pytest.raises(ValueError, match=r"scores of model\.layers\.0\.mlp\.down_proj must be finite and >= 0"):
        select_columns(cols, shapes=shapes, ratio=0.2)


def test_mask_report_counts():
    masks = {"model.layers.0.self_attn.q_proj": torch.eye(3, dtype=torch.bool),
             "model.layers.1.self_attn.q_proj": torch.zeros(3, 3, dtype=torch.bool),
             "model.layers.1.mlp.down_proj": torch.ones(2, 3, dtype=torch.bool)}
    r = select.mask_report(masks)
    assert (r.n_kept, r.n_weights) == (9, 24)
    assert r.per_layer == {0: 3, 1: 6}
    assert r.per_module == {"q_proj": 3, "down_proj": 6}
    assert r.module_weights == {"q_proj": 18, "down_proj": 6}


KEY = {"model": "tiny", "n_calib": 4, "bits": 3, "evals": ("a", "b")}


def test_cache_roundtrip_and_key_mismatch(tmp_path):
    path = tmp_path / "scores.safetensors"
    tensors = {"G/a": torch.rand(3, 4).to(torch.bfloat16), "H_diag/a": torch.rand(4)}
    assert save_cache(path, tensors, KEY) == path
    assert not list(tmp_path.glob("*.tmp"))
    got = load_cache(path, dict(KEY))
    assert set(got) == set(tensors) and all(torch.equal(got[n], tensors[n]) for n in tensors)
    with pytest.warns(CacheWarning, match="differs in: bits"):
        assert load_cache(path, {**KEY, "bits": 4}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing file is a plain miss, no warning
        assert load_cache(tmp_path / "absent.safetensors", KEY) is None


def test_killed_write_never_exposes_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "scores.safetensors"
    save_cache(path, {"G/a": torch.ones(2, 2)}, KEY)
    from tacq_lite.run import score_cache

    def dies_midway(filename, tensors, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 7)  # some bytes of the new file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(score_cache, "write_safetensors", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_cache(path, {"G/a": torch.zeros(2, 2)}, {**KEY, "bits": 2})
    assert torch.equal(load_cache(path, KEY)["G/a"], torch.ones(2, 2))  # the old file is intact
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was cleaned up
    # A hard kill leaves a temp file behind: it is never read in place of the real name.
    other = tmp_path / "other.safetensors"
    (tmp_path / ".other.safetensors.x1.tmp").write_bytes(path.read_bytes())
    assert load_cache(other, KEY) is None


def test_truncated_or_garbage_file_is_a_miss(tmp_path):
    path = tmp_path / "scores.safetensors"
    save_cache(path, {"G/a": torch.rand(64, 64)}, KEY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(CacheWarning, match="unreadable"):
        assert load_cache(path, KEY) is None
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(CacheWarning, match="unreadable"):
        assert load_cache(path, KEY) is None
