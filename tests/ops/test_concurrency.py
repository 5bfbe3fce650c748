"""The ops called from many Python threads at once, with outputs large enough for the CPU output cache.

Eight threads call dcs, dcs_group and their backward on outputs of 1 to 3 MiB of mixed sizes and
dtypes, keep several alive, and check each against symfast.reference bit for bit, while a ninth
thread keeps changing the cache limit (and emptying the cache). At the end every output still holds
its value, and no two live outputs share memory: a cached block handed to two tensors at once
would show up as an overlap or as a value overwritten by another thread.
"""

import threading
import time

import torch

import symfast
from symfast import reference as ref

THREADS = 8
ROUNDS = 12
KEEP = 4  # live outputs per thread
MIB = 1 << 20
# Element counts of 1 to 3 MiB (float32) that are not multiples of one another, so that blocks of
# several sizes are cached and reused for outputs of other sizes.
SIZES = [MIB // 4, MIB // 4 + 1, 3 * MIB // 8 + 5, MIB // 2 - 3, 3 * MIB // 4 + 11]


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _worker(k, start, outputs, errors):
    g = torch.Generator().manual_seed(k)
    live = []
    try:
        start.wait()
        for r in range(ROUNDS):
            n = SIZES[(k + r) % len(SIZES)]
            dtype = torch.float64 if (k + r) % 3 == 0 else torch.float32
            w, u = (torch.randn(n, generator=g, dtype=dtype) for _ in range(2))
            mask = torch.rand(n, generator=g) < 0.5
            op = (k + r) % 3
            if op == 0:
                made = [(symfast.dcs(w, u, u, mask), ref.dcs(w, u, u, mask))]
            elif op == 1:
                W = w.view(-1, 1) if n % 2 else w.view(2, -1)
                s = u[: W.shape[0]]
                made = [(symfast.dcs_group(W, s, 0), ref.dcs_group(W, s, 0))]
            else:
                wl, ul = w.requires_grad_(), u.requires_grad_()
                grad = torch.randn(n, generator=g, dtype=dtype)
                gw, gu = torch.autograd.grad(symfast.dcs(wl, ul, None, mask), (wl, ul), grad)
                want = ref.dcs_backward(grad, w.detach(), u.detach(), mask, True, True, False)
                made = [(gw, want[0]), (gu, want[1])]
            for got, want in made:
                assert torch.equal(_bits(got), _bits(want)), f"thread {k} round {r}: wrong values"
                live.append((got, want))
            del live[:-KEEP]
        outputs[k] = live
    except BaseException as exc:  # reported by the main thread
        errors.append((k, exc))


def _limit_changer(stop, errors):
    limits = [0, 2 * MIB, 16 * MIB, 1 << 30, 5 * MIB]
    i = 0
    try:
        while not stop.is_set():
            symfast.set_cpu_cache_limit(limits[i % len(limits)])
            if i % 7 == 0:
                symfast.empty_cpu_cache()
            i += 1
            time.sleep(1e-4)  # let the workers have the GIL
    except BaseException as exc:
        errors.append(("limit", exc))


def test_eight_threads_get_correct_outputs_that_never_share_memory():
    before = symfast.cpu_cache_info()
    start, stop = threading.Barrier(THREADS), threading.Event()
    outputs, errors = {}, []
    workers = [threading.Thread(target=_worker, args=(k, start, outputs, errors), daemon=True)
               for k in range(THREADS)]
    changer = threading.Thread(target=_limit_changer, args=(stop, errors), daemon=True)
    changer.start()
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in workers), "a worker thread did not finish within 300 s"
    finally:
        stop.set()
        changer.join(timeout=60)
        symfast.set_cpu_cache_limit(before["limit_bytes"])
    assert not changer.is_alive()
    assert not errors, errors
    assert sorted(outputs) == list(range(THREADS))
    assert symfast.cpu_cache_info()["hits"] > before["hits"]  # the cache did hand blocks back out

    live = [got for k in outputs for got, _ in outputs[k]]
    assert len(live) == THREADS * KEEP and all(t.nbytes >= MIB for t in live)
    # Every output still holds its own value: no other thread wrote into its memory.
    for k in outputs:
        for got, want in outputs[k]:
            assert torch.equal(_bits(got), _bits(want)), f"thread {k}: an output changed after it was checked"
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in live)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, f"two live outputs share memory: [{a0:#x}, {a1:#x}) and [{b0:#x}, {b1:#x})"
