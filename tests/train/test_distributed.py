"""A converted model under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2.

Each process computes the single-process reference itself (the whole batch,
no wrapper) and compares its own gradients with it: under DDP every rank holds
the full gradient; under FSDP2 (``fully_shard``) each rank holds its shard,
compared through ``full_tensor()``. The loss is the mean over the batch plus
``symfast.penalty(model)``, so the average over ranks of the half-batch
gradients is the full-batch gradient.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed_workers import gloo_group, spawn_workers
from symfast.conversion import convert, penalty
from symfast.nn import permutation_basis

WORLD = 2
DT = torch.float64

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 8), nn.ReLU(), nn.Linear(8, 8),
        nn.ReLU(), nn.Linear(8, 3),
    ).to(DT)
    convert(model, structure="group", alpha=0.01, include=["0"], warn=False)
    convert(model, structure="elementwise", alpha=0.01, include=["3"], warn=False)
    convert(model, structure="lowrank", alpha=0.01, include=["5"], warn=False)
    convert(model, structure="mirror", alpha=0.01, include=["7"], mirror=permutation_basis(3, [(0, 2)], dtype=DT),
               mirror_dim=0, warn=False)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 2, 6, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)


def _loss(model, x, y):
    return (model(x) - y).pow(2).sum(dim=1).mean()


def _worker(rank, init_file, mode):
    torch.set_num_threads(1)
    with gloo_group(rank, init_file, WORLD):
        x, y = _data()
        reference = _model()
        (_loss(reference, x, y) + penalty(reference)).backward()
        expected = {n: p.grad for n, p in reference.named_parameters()}

        model = _model()
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            (_loss(wrapped, xs, ys) + penalty(model)).backward()
            got = {n: p.grad for n, p in model.named_parameters()}
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            assert all(hasattr(p, "full_tensor") for p in model.parameters())  # sharded: DTensors
            # Each rank sums its shards and symfast.penalty all-reduces: every rank has the whole penalty.
            total = penalty(model)
            assert not hasattr(total, "full_tensor")
            torch.testing.assert_close(total.detach(), penalty(reference).detach())
            (_loss(model, xs, ys) + total).backward()
            got = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        assert set(got) == set(expected)
        for n, g in got.items():
            torch.testing.assert_close(g, expected[n], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {n}")


def _spawn(tmp_path, mode):
    init_file = tmp_path / f"{mode}_init"
    spawn_workers(_worker, (str(init_file), mode), nprocs=WORLD)


def test_ddp_gradients_equal_single_process(tmp_path):
    _spawn(tmp_path, "ddp")


def _fsdp2_missing():
    """Why FSDP2 cannot run here, or None. fully_shard is public since torch 2.6 (CPU with gloo works)."""
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError as exc:
        return f"torch {torch.__version__}: torch.distributed.fsdp does not import ({exc})"
    if not hasattr(fsdp, "fully_shard"):
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2 needs torch >= 2.6)"
    return None


@pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))
def test_fsdp2_gradients_equal_single_process(tmp_path):
    _spawn(tmp_path, "fsdp2")
