"""TaCQ's backward passes over several processes: torch.distributed, one model replica per rank.

TaCQ's saliency G = Σ_samples |dL/dW| (algo/gradients.py; Xiao et al., 2025, Sec. 3.2) is a sum
of one batch-1 backward per calibration sample, so the samples can be dealt out: rank r of W
takes samples r, r+W, r+2W, ..., sums |g| into float32 accumulators on its own replica, and one
all_reduce(SUM) per accumulator at the end adds up the ranks' partial sums. This is not DDP,
which averages the signed gradient of a batch: TaCQ takes |g| per sample before summing. Every
rank returns the full sums, equal to the one-process result up to float32 rounding (the samples
are summed in another order).

    torchrun --nproc_per_node 2 -m tacq_lite.run.distributed --model embedded --calib wikitext2 \\
        --n-calib 16 --seq-len 512 --out G.safetensors [--device cuda|cpu] [--backend gloo|nccl]

Rank 0 writes G as safetensors; the file's metadata holds a JSON record under "tacq_lite"
(world size, samples, tokens, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..algo import gradients
from ..config import QuantConfig
from ..data import corpus
from ..io import atomic_file, check_output_file
from ..model import loading, walk

LAUNCH = "torchrun --nproc_per_node N -m tacq_lite.run.distributed"


def _rank_in(group) -> tuple[int, int]:
    """(rank, world size) of this process in `group`; raise unless there is such a group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed_gradients needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) on every rank first, or launch the command line with "
            f"`{LAUNCH} ...`. In a single process, call algo.gradients.accumulate_gradients instead."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of `group`; call distributed_gradients on its ranks only.")
    return rank, dist.get_world_size(group)


def _reduce_device(backend: str, t: torch.Tensor) -> torch.device:
    """Where `backend` can all_reduce `t`: gloo on the CPU, nccl on a CUDA device."""
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and not t.is_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return t.device  # nccl with a CUDA tensor, or one backend per device type ("cpu:gloo,cuda:nccl")


def _all_reduce(t: torch.Tensor, op, group, backend: str) -> None:
    """all_reduce `t` in place; through a copy on another device where the backend needs one."""
    dev = _reduce_device(backend, t)
    buf = t if t.device == dev else t.to(dev)
    dist.all_reduce(buf, op=op, group=group)
    if buf is not t:
        t.copy_(buf)


def _check_same_samples(pairs, group, backend: str) -> None:
    """Every rank must be given the same samples: compare counts and token sums (max and -min over ranks)."""
    local = torch.tensor([len(pairs), sum(int(ids.sum()) for ids, _ in pairs),
                          sum(int(mask.sum()) for _, mask in pairs)], dtype=torch.int64)  # [3]
    spread = torch.cat([local, -local])  # [6]
    _all_reduce(spread, dist.ReduceOp.MAX, group, backend)
    if not torch.equal(spread[:3], -spread[3:]):
        raise ValueError("the ranks were given different samples (count or tokens differ); give every rank the "
                         "same samples, e.g. the same calibration windows from the same seed.")


def distributed_gradients(
    model: torch.nn.Module,
    samples,
    *,
    loss: str = "auto",  # as in accumulate_gradients
    squares: bool = False,  # also Σ g²
    accum_device: torch.device | str | None = None,  # None: beside each weight
    checkpointing: bool = False,
    progress: bool = True,  # a bar on rank 0 only
    group=None,  # None: the default process group
) -> gradients.GradResult:
    """Σ|g| (and Σg²) per targeted linear over `samples`, the passes shared by the ranks of `group`.

    Call it on every rank of an initialised process group, each with its own replica of the same
    model and the same samples; every rank returns the full sums. Accumulators are float32, the
    dtype the all_reduce adds. seconds_per_sample is wall seconds of the whole call,
    slowest rank included, per sample: the throughput of the group. An error on one rank leaves
    the others waiting in all_reduce until the launcher (torchrun, mp.spawn) stops them.
    """
    rank, world = _rank_in(group)
    backend = dist.get_backend(group)
    start = time.perf_counter()
    pairs = gradients.as_pairs(samples, loss)  # the same check, and the same error, on every rank
    _check_same_samples(pairs, group, backend)
    share = pairs[rank::world]  # masks are final: loss="auto" below keeps them
    if share:
        res = gradients.accumulate_gradients(model, share, squares=squares, accum_dtype=torch.float32,
                                             accum_device=accum_device, checkpointing=checkpointing,
                                             progress=progress and rank == 0)
        G, G2, counts = res.G, res.G2, [res.n_samples, res.n_tokens]
    else:  # more ranks than samples: this rank adds zeros
        weights = {n: lin.weight for n, lin in walk.named_linears(model).items()}
        G = {n: torch.zeros(w.shape, dtype=torch.float32, device=accum_device or w.device) for n, w in weights.items()}
        G2 = {n: torch.zeros_like(g) for n, g in G.items()} if squares else None
        counts = [0, 0]
    for acc in (G, G2 or {}):
        for g in acc.values():  # [rows, cols] each, reduced on its own device (device_map: beside its weight)
            _all_reduce(g, dist.ReduceOp.SUM, group, backend)
    totals = torch.tensor(counts, dtype=torch.int64)  # [n_samples, n_tokens]
    _all_reduce(totals, dist.ReduceOp.SUM, group, backend)
    n_samples, n_tokens = totals.tolist()
    seconds = time.perf_counter() - start  # after the last all_reduce: the slowest rank's time too
    return gradients.GradResult(G, G2, n_samples, n_tokens, seconds / n_samples)


def _parser() -> argparse.ArgumentParser:
    d = QuantConfig()
    p = argparse.ArgumentParser(prog=LAUNCH, description="TaCQ's gradient saliency G = Σ|dL/dW|, samples "
                                "shared by the ranks; rank 0 writes G as safetensors.")
    p.add_argument("--model", default=d.model, help="'embedded', a Hugging Face id, or a local folder")
    p.add_argument("--calib", default=d.calib, help="'wikitext2' or a text file")
    p.add_argument("--n-calib", type=int, default=d.n_calib, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window")
    p.add_argument("--seed", type=int, default=d.seed, help="where the windows start")
    p.add_argument("--out", required=True, help="the .safetensors file rank 0 writes")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: rank r on cuda:LOCAL_RANK")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args) -> Path:
    """Raise ValueError on what would fail later: not under torchrun, an unwritable --out, no GPU."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"not launched under torchrun ({', '.join(missing)} unset); run `{LAUNCH} ...`.")
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it or choose another.")
    check_output_file(out, "--out")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu.")
    if args.backend == "nccl" and args.device == "cpu":
        raise ValueError("--backend nccl needs --device cuda; use --backend gloo on the CPU.")
    return out


def main(argv=None) -> int:
    """The torchrun entry: every rank loads the model and the windows, rank 0 writes G. Bad input: exit 2."""
    from safetensors.torch import save_file

    args = _parser().parse_args(argv)
    try:
        out = _check_args(args)
        local_rank = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))
        model, tok = loading.load_model(args.model)
        windows = corpus.calibration_windows(tok, args.calib, n=args.n_calib, seq_len=args.seq_len,
                                             seed=args.seed)  # [n, seq_len], the same on every rank
        res = distributed_gradients(model.to(device), windows, progress=not args.quiet)
        if dist.get_rank() == 0:
            record = {"world_size": dist.get_world_size(), "n_samples": res.n_samples, "n_tokens": res.n_tokens,
                      "seconds": res.seconds_per_sample * res.n_samples, "seconds_per_sample": res.seconds_per_sample,
                      "model": args.model, "calib": args.calib, "seq_len": args.seq_len, "seed": args.seed,
                      "backend": dist.get_backend(), "device": args.device}
            with atomic_file(out) as tmp:
                save_file({n: g.cpu().contiguous() for n, g in res.G.items()}, str(tmp),
                          metadata={"tacq_lite": json.dumps(record)})
                umask = os.umask(0o022)
                os.umask(umask)
                tmp.chmod(0o666 & ~umask)  # safetensors writes its files 0600; give G the usual mode
            print(json.dumps(record))
    except (ValueError, OSError) as err:
        why = (str(err).strip() or type(err).__name__).splitlines()[0]
        print(f"tacq_lite.run.distributed (rank {os.environ.get('RANK', '?')}): error: {why}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
