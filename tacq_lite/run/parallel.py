"""TaCQ's backward passes started in a forked worker beside the first GPTQ pass.

On a CPU with few cores, TaCQ's first GPTQ pass keeps a second thread only partly busy, so
run/tacq.py starts a `GradientWorker` on the backward passes (algo/gradients.py) and runs the GPTQ
pass on one thread (`single_thread`) meanwhile; then this process takes over the samples left.
Linux and CPU only (fork).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import sys
import time

import torch
from torch import nn

from ..algo import gradients
from ..model import walk


@contextlib.contextmanager
def single_thread():
    """Run the enclosed torch work on one thread (restored on exit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    A backward pass allocates and frees hundreds of MB of activations in pieces that glibc keeps in
    its heap for reuse, so the process stays that large through the GPTQ pass that follows; trimming
    returns them at once (measured in BENCHMARKS.md, issue 21)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


WORKER_NAME = b"tacq_lite-grad"  # what `ps` / /proc/PID/comm show for the worker (15 bytes at most)


def _die_with_parent(parent_pid: int) -> None:
    """In the forked worker: let the kernel kill it (SIGKILL) the moment its parent dies, by any
    signal, SIGKILL included (Linux prctl PR_SET_PDEATHSIG); exit now if the parent is already gone."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    libc.prctl(15, ctypes.c_char_p(WORKER_NAME), 0, 0, 0)  # 15 = PR_SET_NAME
    if os.getppid() != parent_pid:  # the parent died between fork and prctl
        os._exit(1)


class GradientWorker:
    """TaCQ's backward passes started in a forked one-thread process while this one runs the first
    GPTQ pass, then handed back.

    TaCQ's first GPTQ pass does not need the gradients, and on a CPU with few cores it keeps a
    second thread only partly busy (its column loop and the elementwise ops of a 512-token window
    are small). So `run.tacq.compute_importance` starts this worker, runs the GPTQ pass on one
    thread meanwhile, and then calls `result()`: the worker finishes the sample it is on and stops,
    and this process takes the samples still left, with all its threads. One backward pass runs at
    a time, so the activations of two (about 1.1 GB each for a 512-token window of the embedded
    model) are never held together.

    Samples are taken in order (0, 1, 2, ...) and added in that order into one set of float32
    accumulators in shared memory, first by the worker, then here: the sum is the one-process sum,
    in the same order, whichever process ran which sample. It is the same bit for bit as
    `accumulate_gradients` on the same samples where a sample's gradient does not depend on the
    thread count (measured on the 2-core CI machine: all 106 M entries of the embedded model's
    gradient equal on 1 and 2 threads; tests/test_gradients.py checks the equality).

    The forked process sees the model as it was when the worker started (copy-on-write); later
    changes to the model here do not reach it (the first pass swaps tensors rather than writing
    into shared pages, run/passes.py). Linux and CPU only (`fork`); `usable(model)` says whether it
    can run. The worker dies with its parent: the kernel kills it when the parent ends by any
    signal, SIGKILL included (`_die_with_parent`), so a killed run leaves no orphan burning CPU.
    """

    def __init__(self, model: nn.Module, samples, *, loss: str = "auto", squares: bool = False):
        import multiprocessing

        if not self.usable(model, any_threads=True):
            raise RuntimeError("GradientWorker needs Linux (fork) and a model on the CPU; call algo.gradients.accumulate_gradients instead.")
        self._pairs = gradients.as_pairs(samples, loss)
        gradients.check_float32(model)
        self._model = model
        shapes = {n: tuple(lin.weight.shape) for n, lin in walk.named_linears(model).items()}
        ctx = multiprocessing.get_context("fork")
        self._next = ctx.Value("q", 0)  # index of the next sample to take
        self._stop = ctx.Value("b", 0)  # set by result(): the worker takes no new sample
        self._child_tokens = ctx.Value("q", 0)
        self._errors = ctx.SimpleQueue()
        # The accumulators live in an anonymous shared mapping (not /dev/shm, which may be small).
        numel = sum(r * c for r, c in shapes.values()) * (2 if squares else 1)
        self._buffer = mmap.mmap(-1, max(4 * numel, 4))
        flat = torch.frombuffer(self._buffer, dtype=torch.float32, count=numel)  # [numel] zeros
        views, offset = {}, 0
        for part in ("G", "G2") if squares else ("G",):
            views[part] = {}
            for n, (r, c) in shapes.items():
                views[part][n] = flat[offset : offset + r * c].view(r, c)
                offset += r * c
        self._shared = views
        self._squares = squares
        self._start = time.perf_counter()
        self._parent_pid = os.getpid()
        self._process = ctx.Process(target=self._child, name="tacq_lite-gradients", daemon=True)
        import gc

        trim_heap()  # free heap pages are not carried into the worker
        gc.freeze()  # objects alive now are left alone by the collector: fewer pages copied into the worker
        try:
            self._process.start()
        finally:
            gc.unfreeze()

    @staticmethod
    def usable(model: nn.Module | None = None, *, any_threads: bool = False) -> bool:
        """True on Linux with every parameter on the CPU and (unless any_threads) two or more torch threads.

        model=None asks about the platform only, before a model is loaded."""
        on_cpu = model is None or all(p.device.type == "cpu" for p in model.parameters())
        return sys.platform.startswith("linux") and on_cpu and (any_threads or torch.get_num_threads() >= 2)

    def _take(self) -> int:
        with self._next.get_lock():
            i = self._next.value
            self._next.value += 1
        return i

    def _work(self, *, worker: bool, bar=None) -> int:
        n_tokens = 0
        G, G2 = self._shared["G"], self._shared.get("G2")
        with gradients.gradient_session(self._model, G, G2) as run:
            while not (worker and self._stop.value) and (i := self._take()) < len(self._pairs):
                if worker and os.getppid() != self._parent_pid:
                    os._exit(1)  # the worker's parent is gone (a second guard beside PR_SET_PDEATHSIG)
                n_tokens += run(*self._pairs[i])
                if bar is not None:
                    bar.update(1)
        return n_tokens

    def _child(self) -> None:
        _die_with_parent(self._parent_pid)
        torch.set_num_threads(1)
        try:
            self._child_tokens.value = self._work(worker=True)
        except BaseException as err:  # noqa: BLE001 - reported by result() in the parent
            self._errors.put(f"{type(err).__name__}: {err}")
            raise

    def result(self, progress: bool = True, out_dtype: torch.dtype = torch.float32) -> gradients.GradResult:
        """Stop the worker after its current sample, take the samples still left here, return the sums.

        out_dtype: the sums are converted one linear at a time (no second float32 copy of them all).
        """
        from tqdm.auto import tqdm

        self._stop.value = 1
        try:
            self._process.join()
        except BaseException:
            self.cancel()
            raise
        if self._process.exitcode != 0:
            why = self._errors.get() if not self._errors.empty() else f"exit code {self._process.exitcode}"
            self._release()
            raise RuntimeError(f"the gradient worker process failed ({why}); rerun with config.parallel=False (CLI: --no-parallel) to see it here.")
        with self._next.get_lock():  # the worker took samples 0 .. taken-1 and finished each of them
            taken = min(self._next.value, len(self._pairs))
            self._next.value = taken
        bar = tqdm(total=len(self._pairs), initial=taken, desc="gradients", disable=not progress)
        try:
            n_tokens = self._child_tokens.value + self._work(worker=False, bar=bar)
        except BaseException:
            self._release()
            raise
        finally:
            bar.close()
        out = {n: g.to(out_dtype, copy=True) for n, g in self._shared["G"].items()}  # not views of the buffer
        out2 = {n: g.to(out_dtype, copy=True) for n, g in self._shared["G2"].items()} if self._squares else None
        seconds = (time.perf_counter() - self._start) / len(self._pairs)
        self.taken_by_worker = taken
        self._release()
        return gradients.GradResult(out, out2, len(self._pairs), n_tokens, seconds)

    def cancel(self) -> None:
        """Stop the worker (if running) and free its buffer; result() cannot be called afterwards."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._release()

    def _release(self) -> None:
        self._shared = {}
        try:
            self._buffer.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
