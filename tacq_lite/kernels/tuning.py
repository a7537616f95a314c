"""Pick a kernel's block sizes by timing a short list once per shape, on the GPU that runs it.

`pick(key, configs, run, device=...)` returns the fastest of `configs` for `key` (the kernel's
name and everything its speed depends on: rows, cols, bits, groupsize, M, dtype, device). On a
CUDA device the first call for a key times every configuration with `triton.testing.do_bench`
and remembers the winner for the life of the process; later calls are a dictionary lookup. On
the CPU (the Triton interpreter) timing says nothing about a GPU, so the first configuration is
used untimed; so it is when TACQ_LITE_KERNEL_TUNING=0 (tests that cover many shapes set it, since
each timed shape compiles every configuration). Tuning synchronizes the device, so warm a model
up before capturing a CUDA graph.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

_CHOSEN: dict[tuple, dict] = {}


def _do_bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


def pick(key: tuple, configs: list[dict], run: Callable[[dict], object], *, device: torch.device | str,
         timer: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """The configuration to use for `key`: timed once on CUDA (or with `timer`), else configs[0]."""
    if not configs:
        raise ValueError(f"no configurations to choose from for {key}.")
    if key in _CHOSEN:
        return _CHOSEN[key]
    if timer is None:
        if torch.device(device).type != "cuda" or os.environ.get("TACQ_LITE_KERNEL_TUNING") == "0":
            return configs[0]
        timer = _do_bench_ms
    times = [timer(lambda cfg=cfg: run(cfg)) for cfg in configs]
    _CHOSEN[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return _CHOSEN[key]


def chosen_for(key: tuple) -> dict | None:
    """The configuration already chosen for `key`, or None (a lookup: nothing is built or timed)."""
    return _CHOSEN.get(key)


def chosen() -> dict[tuple, dict]:
    """A copy of every choice made so far (for benchmark records)."""
    return dict(_CHOSEN)


def forget() -> None:
    """Drop every choice, so the next call of each kernel times again."""
    _CHOSEN.clear()
