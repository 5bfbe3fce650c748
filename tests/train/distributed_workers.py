"""Helpers for tests that run several processes (torch.distributed with gloo on CPU)."""

import contextlib
import os
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def gloo_group(rank, init_file, world_size):
    """A gloo process group for a test worker, left without teardown on success.

    Tearing down DDP/gloo state can deadlock in torch itself (seen on torch
    2.13 CPU: the Reducer's destructor, holding the GIL, joins a gloo worker
    thread that waits for the GIL). So a worker that finished its checks
    leaves through a barrier and os._exit(0), before any destructor runs; a
    worker that failed raises, and spawn_workers reports it.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    yield
    dist.barrier()
    os._exit(0)


def spawn_workers(fn, args, nprocs=2, timeout=180):
    """Runs fn(rank, *args) in nprocs processes; fails, never hangs, past timeout."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=2):  # raises if a worker raised or died
            if time.monotonic() > deadline:
                pytest.fail(f"{nprocs} workers did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
