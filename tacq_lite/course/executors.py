"""Where a sweep's runs execute: one at a time in this process, N at a time in local worker
processes, or on the workers of a running Dask cluster.

All three are `concurrent.futures` executors, so course/sweep.py submits runs and gathers their
outcomes with one loop whichever is chosen. Local workers are pinned to `cpus // N` threads each
(torch, MKL and OpenBLAS read OMP_NUM_THREADS and friends when they start, and a notebook kernel
inherits its worker's environment), so N runs share the cores instead of each taking all of them.
A Dask worker started by a nanny already sets these variables to 1 (distributed.yaml,
`distributed.nanny.pre-spawn-environ`). The cluster is reached through `distributed.Client`,
imported only when a scheduler address is given.
"""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import NamedTuple

SCHEDULER_TIMEOUT_S = 10.0  # seconds to wait for a Dask scheduler before giving up on its address
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class EngineError(RuntimeError):
    """The engine asked for cannot run the sweep (no scheduler at the address, Dask not installed);
    the message names the address and says what to do."""


class Engine(NamedTuple):
    executor: Executor
    slots: int | None  # runs in flight at once; None: submit them all and let the cluster queue them
    where: str         # for the log, e.g. "2 local worker processes, 1 thread each"


class InlineExecutor(Executor):
    """Runs each call when it is submitted, in this process: the serial sweep, which an interrupt
    (KeyboardInterrupt is not caught) stops at once."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 -- handed to the caller through the future, as a pool does
            future.set_exception(err)
        return future


def available_cpus() -> int:
    """The cores this process may run on (the affinity mask where the OS has one, e.g. under taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    return max(1, available_cpus() // workers)


def pin_threads(threads: int) -> None:
    """Initializer of a local worker process: it and the kernels it starts use `threads` threads."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


async def _identity(address: str, timeout: float) -> dict:
    from distributed.core import rpc

    async with rpc(address, timeout=timeout) as peer:
        return await asyncio.wait_for(peer.identity(), timeout)


def _check_scheduler(address: str, timeout: float) -> None:
    """Raise unless a Dask scheduler answers at `address`. A TCP connect first, so that a refused
    port or an unknown host fails at once (Dask retries those until its timeout); then Dask's
    identity call, so that a server of another kind fails before a Client is built on it (a
    Client that failed to start takes twice its timeout more to close)."""
    from distributed.comm import get_address_host_port, parse_address

    scheme, _ = parse_address(address)  # ValueError for a scheme Dask does not know
    if scheme in ("tcp", "tls", "ws", "wss"):
        socket.create_connection(get_address_host_port(address), timeout=timeout).close()
    with ThreadPoolExecutor(1) as thread:  # a thread of its own: a notebook calling us runs an event loop
        try:
            kind = thread.submit(asyncio.run, _identity(address, timeout)).result().get("type")
        except OSError:  # timed out
            raise
        except Exception as err:  # noqa: BLE001 -- a reply of another protocol read as Dask's can raise anything
            raise ValueError(f"something answered, but not in Dask's protocol: {type(err).__name__}") from None
    if kind != "Scheduler":
        raise ValueError(f"a Dask {kind} answered, not a Scheduler")


def _connect(address: str, timeout: float):
    """A Client of the Dask scheduler at `address`; EngineError naming it when none answers."""
    try:
        from distributed import Client
    except ImportError:
        raise EngineError("--scheduler needs Dask's distributed package: pip install 'tacq_lite[cluster]'") from None
    try:
        _check_scheduler(address, timeout)
        return Client(address, timeout=timeout, set_as_default=False)
    except Exception as err:  # noqa: BLE001 -- refused, timed out, not an address, not a scheduler
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EngineError(f"no Dask scheduler answered at {address} within {timeout:g} s ({reason}); start one "
                          "with `dask scheduler` or check the --scheduler address.") from None


@contextlib.contextmanager
def open_engine(*, workers: int = 1, scheduler: str | None = None) -> Iterator[Engine]:
    """The executor for `workers` local runs at a time, or for the cluster behind `scheduler`.

    Connecting happens here, before the caller writes anything, so a wrong address fails within
    SCHEDULER_TIMEOUT_S (at once for a refused port). On leaving, runs not yet started are cancelled.
    """
    if scheduler is not None:
        client = _connect(scheduler, SCHEDULER_TIMEOUT_S)
        try:
            n = sum(client.nthreads().values())
            where = (f"the Dask cluster at {scheduler} ({n} worker thread{'s' if n != 1 else ''})" if n else
                     f"the Dask cluster at {scheduler} (no workers yet: runs wait until some join)")
            # pure=False: a run writes files, so resubmitting the same parameters must run it again
            executor = client.get_executor(pure=False)
            try:
                yield Engine(executor, None, where)
            finally:
                executor.shutdown(wait=False)  # cancels what is still queued on the cluster
        finally:
            client.close()
    elif workers == 1:
        yield Engine(InlineExecutor(), 1, "one run at a time in this process")
    else:
        threads = threads_per_worker(workers)
        # spawn, not fork: the caller may hold torch's thread pools, which a forked child inherits broken
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=pin_threads, initargs=(threads,))
        try:
            yield Engine(executor, workers, f"{workers} local worker processes, {threads} thread"
                                            f"{'s' if threads != 1 else ''} each")
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["SCHEDULER_TIMEOUT_S", "Engine", "EngineError", "InlineExecutor", "available_cpus", "open_engine",
           "pin_threads", "threads_per_worker"]
