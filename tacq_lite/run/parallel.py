"""Two processes for TaCQ's backward passes: this one and a forked worker, one thread each.

On a CPU with few cores, TaCQ's first GPTQ pass keeps a second thread only partly busy, so
run/tacq.py starts a `GradientWorker` on the backward passes (algo/gradients.py) and runs the GPTQ
pass on one thread (`single_thread`) meanwhile. Linux and CPU only (fork).
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
    """The backward passes, shared between this process and a forked one, one thread each.

    TaCQ's first GPTQ pass does not need the gradients, and on a CPU with few cores it keeps a
    second thread only partly busy (its column loop and the elementwise ops of a 512-token window
    are small). So `run.tacq.compute_importance` starts this worker, runs the GPTQ pass on one thread
    meanwhile, and then calls `result()`, where this process takes the samples still left.
    Samples are handed out one at a time from a shared counter, so both processes finish
    together however long the other work took. On 2 cores, Q(W) plus gradients took 10 % less
    time than one after the other, back to back (BENCHMARKS.md, "10 minutes: the backward passes
    beside the first GPTQ pass"). Backward passes alone gain nothing from it: the worker ran them
    as fast as `accumulate_gradients` in one process with two threads.

    The forked process sees the model as it was when the worker started (copy-on-write); later
    changes to the model here do not reach it. Both processes add into one set of float64
    accumulators in shared memory, each linear's under its own lock. Float64 is needed for one
    reason: which process takes which sample, and so the order of the additions, depends on
    timing, and a float32 sum in another order rounds differently; the float64 sum, rounded to
    float32 once at the end, is the same whatever the order (its rounding error is about 2⁻²⁹ of
    float32's last bit), so the same command gives the same G, bit for bit (BENCHMARKS.md, "What
    changes a result besides the seed"). It equals the one-process float32 sum to float32 rounding. Linux and CPU only (`fork`);
    `usable(model)` says whether it can run. The worker dies with its parent: the kernel kills it
    when the parent ends by any signal, SIGKILL included (`_die_with_parent`), so a killed run
    leaves no orphan burning CPU.
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
        self._done = ctx.Value("q", 0)  # samples finished, by either process
        self._child_tokens = ctx.Value("q", 0)
        self._errors = ctx.SimpleQueue()
        self._locks = {n: ctx.Lock() for n in shapes}  # one per linear: both processes add into one buffer
        # The accumulators live in an anonymous shared mapping (not /dev/shm, which may be small).
        numel = sum(r * c for r, c in shapes.values()) * (2 if squares else 1)
        self._buffer = mmap.mmap(-1, max(8 * numel, 8))
        flat = torch.frombuffer(self._buffer, dtype=torch.float64, count=numel)  # [numel] zeros
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
        self._process.start()

    @staticmethod
    def usable(model: nn.Module, *, any_threads: bool = False) -> bool:
        """True on Linux with every parameter on the CPU and (unless any_threads) two or more torch threads."""
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        return sys.platform.startswith("linux") and on_cpu and (any_threads or torch.get_num_threads() >= 2)

    def _take(self) -> int:
        with self._next.get_lock():
            i = self._next.value
            self._next.value += 1
        return i

    def _work(self, bar=None) -> int:
        n_tokens = 0
        G, G2 = self._shared["G"], self._shared.get("G2")
        with gradients.gradient_session(self._model, G, G2, locks=self._locks) as run:
            while (i := self._take()) < len(self._pairs):
                if os.getppid() != self._parent_pid and os.getpid() != self._parent_pid:
                    os._exit(1)  # the worker's parent is gone (a second guard beside PR_SET_PDEATHSIG)
                n_tokens += run(*self._pairs[i])
                with self._done.get_lock():
                    self._done.value += 1
                    done = self._done.value
                if bar is not None:
                    bar.update(done - bar.n)
        return n_tokens

    def _child(self) -> None:
        _die_with_parent(self._parent_pid)
        torch.set_num_threads(1)
        try:
            self._child_tokens.value = self._work()
        except BaseException as err:  # noqa: BLE001 - reported by result() in the parent
            self._errors.put(f"{type(err).__name__}: {err}")
            raise

    def result(self, progress: bool = True, out_dtype: torch.dtype = torch.float32) -> gradients.GradResult:
        """Take the samples still left on this process (one thread), wait for the worker; the sums.

        Each linear's float64 sum is rounded to float32, then to out_dtype (one linear at a time,
        so a float32 copy of every accumulator never exists when out_dtype is 16-bit).
        """
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self._pairs), desc="gradients (2 processes)", disable=not progress)
        try:
            with single_thread():
                n_tokens = self._work(bar)
            self._process.join()
            bar.update(self._done.value - bar.n)
        except BaseException:
            self.cancel()
            raise
        finally:
            bar.close()
        if self._process.exitcode != 0:
            why = self._errors.get() if not self._errors.empty() else f"exit code {self._process.exitcode}"
            self._release()
            raise RuntimeError(f"the gradient worker process failed ({why}); rerun with config.parallel=False (CLI: --no-parallel) to see it here.")
        n_tokens += self._child_tokens.value
        out = {n: g.float().to(out_dtype) for n, g in self._shared["G"].items()}
        out2 = {n: g.float().to(out_dtype) for n, g in self._shared["G2"].items()} if self._squares else None
        seconds = (time.perf_counter() - self._start) / len(self._pairs)
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
