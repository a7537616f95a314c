"""Tests for tacq_lite.run.distributed: G over several gloo ranks equals the one-process G, and the CLI.

The ranks are forked processes (spawned where fork is missing) with one thread each. The per-sample
gradients are the same computation in every process, but the ranks sum them in another order
(rank 0: samples 0, 2, 4; rank 1: 1, 3; then rank 0 + rank 1) than one process does (0 + 1 + ... + 4),
and float32 addition is not associative: G agrees to rounding (rtol 1e-6), not bitwise.
"""
import json
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM  # noqa: F401  imported here once, so that forked ranks need not

from tacq_lite.algo.gradients import accumulate_gradients
from tacq_lite.data import corpus
from tacq_lite.model import walk
from tacq_lite.model.loading import load_model, tiny_llama
from tacq_lite.run import distributed
from tacq_lite.run.distributed import distributed_gradients

SUM_ORDER = {"rtol": 1e-6, "atol": 0.0}  # float32 sums in another order; nothing else differs


def windows(n, T=16, seed=0):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))  # [n, T]


def answer_pairs(n, T=16):
    """(ids, mask) pairs whose scored spans differ in length: n_tokens is not n * (T - 1)."""
    return [(ids, torch.arange(T) >= T - 3 - i) for i, ids in enumerate(windows(n, T, seed=1))]


SAMPLES = {"text": windows, "answers": answer_pairs}


def run_ranks(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` processes; an exception in one is raised here."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(fn, args=(world, *args), nprocs=world, start_method=method)


def _gradients_rank(rank, world, folder, kind, n, squares):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        res = distributed_gradients(tiny_llama(seed=0), SAMPLES[kind](n), squares=squares, progress=False)
        tensors = {f"G/{k}": v for k, v in res.G.items()} | {f"G2/{k}": v for k, v in (res.G2 or {}).items()}
        save_file(tensors, f"{folder}/rank{rank}.safetensors",
                  metadata={"n_samples": str(res.n_samples), "n_tokens": str(res.n_tokens)})
    finally:
        dist.destroy_process_group()


def distributed_results(tmp_path, world, kind, n, squares=False):
    """What every rank returned: [(tensors, n_samples, n_tokens)] by rank."""
    run_ranks(_gradients_rank, world, str(tmp_path), kind, n, squares)
    results = []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.safetensors"
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        results.append((load_file(path), int(meta["n_samples"]), int(meta["n_tokens"])))
    return results


@pytest.mark.parametrize("kind, n, world, squares", [
    ("text", 5, 2, False),  # 3 + 2 samples
    ("answers", 5, 2, True),  # G2 too; answer masks of different lengths
    ("text", 2, 3, False),  # rank 2 has no sample and adds zeros
])
def test_ranks_return_the_one_process_sums(tmp_path, kind, n, world, squares):
    results = distributed_results(tmp_path, world, kind, n, squares)
    ref = accumulate_gradients(tiny_llama(seed=0), SAMPLES[kind](n), squares=squares, progress=False)
    names = set(walk.named_linears(tiny_llama(seed=0)))
    for rank, (tensors, n_samples, n_tokens) in enumerate(results):
        assert (n_samples, n_tokens) == (ref.n_samples, ref.n_tokens) == (n, ref.n_tokens), rank
        assert {k.split("/", 1)[1] for k in tensors if k.startswith("G/")} == names
        assert any(k.startswith("G2/") for k in tensors) == squares
        for name in names:  # a sum of all ranks' |g|: not one rank's share, not a DDP-style average
            torch.testing.assert_close(tensors[f"G/{name}"], ref.G[name], **SUM_ORDER, msg=f"rank {rank} G {name}")
            if squares:
                torch.testing.assert_close(tensors[f"G2/{name}"], ref.G2[name], **SUM_ORDER, msg=f"G2 {name}")
    if kind == "answers":
        assert ref.n_tokens != n * 15  # the masks, not the window length, set n_tokens


def _mismatched_rank(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        distributed_gradients(tiny_llama(seed=0), windows(3 + rank), progress=False)
    finally:
        dist.destroy_process_group()


def test_ranks_given_different_samples_all_fail(tmp_path):
    with pytest.raises(Exception, match="different samples"):
        run_ranks(_mismatched_rank, 2, str(tmp_path))


def test_without_a_process_group_the_error_says_how_to_start_one():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"torch\.distributed\.init_process_group.*torchrun"):
        distributed_gradients(tiny_llama(layers=1), windows(2), progress=False)


# ---- the torchrun command line ----

def save_tiny_model(folder):
    """A 2-layer Llama (vocab 256) with a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_llama(seed=0).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_rank(rank, world, port, argv):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert distributed.main(argv) == 0


def test_cli_on_two_ranks_writes_the_one_process_G(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(7 * i) % 100}" for i in range(400)))
    out = tmp_path / "G.safetensors"
    argv = ["--model", str(model_dir), "--calib", str(text), "--n-calib", "5", "--seq-len", "16", "--seed", "3",
            "--out", str(out), "--device", "cpu", "--quiet"]
    run_ranks(_cli_rank, 2, free_port(), argv)

    model, tok = load_model(str(model_dir))
    ref = accumulate_gradients(model, corpus.calibration_windows(tok, str(text), n=5, seq_len=16, seed=3),
                               progress=False)
    G = load_file(out)
    assert set(G) == set(ref.G)
    for name in G:
        torch.testing.assert_close(G[name], ref.G[name], **SUM_ORDER)
    with safe_open(out, "pt") as f:
        record = json.loads(f.metadata()["tacq_lite"])
    assert record["world_size"] == 2 and record["backend"] == "gloo"
    assert (record["n_samples"], record["n_tokens"]) == (5, 5 * 15) and record["seconds"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600


def clean_exit_2(capsys, argv) -> str:
    assert distributed.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_outside_torchrun_exits_2(monkeypatch, capsys, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert "not launched under torchrun" in clean_exit_2(capsys, ["--out", str(tmp_path / "G.safetensors")])


def test_cli_out_in_a_missing_folder_exits_2_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    err = clean_exit_2(capsys, ["--out", str(tmp_path / "nowhere" / "G.safetensors"), "--device", "cpu"])
    assert "does not exist" in err
    assert not dist.is_initialized()
