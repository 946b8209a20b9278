"""Training on torch.distributed (2 gloo processes): DDP HybridEncoder parameters after k steps
equal single-process training on the same global batch; a sequence-parallel attention model
trained on a sequence split over the ranks equals training it on the whole sequence in one
process; python/ddp_train.py runs under torchrun."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import hybrid_kernels.distributed as hkd
from hybrid_kernels.service.process import free_port
from test_distributed import _init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "python", "ddp_train.py")


def _example():
    spec = importlib.util.spec_from_file_location("ddp_train", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_same_parameters(a, b, name):
    for (n, p), (_, r) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, r, atol=2e-5, rtol=1e-4, msg=f"{name}: {n}")


def _train_both(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    ex = _example()
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    torch.manual_seed(0)
    model = ex.Classifier()
    alone = copy.deepcopy(model)
    ex.train_ddp(DDP(model), steps=3, rank=rank, world=world)
    ex.train_ddp(alone, steps=3, rank=0, world=1)
    _assert_same_parameters(model, alone, "DDP HybridEncoder")

    torch.manual_seed(1)
    sp = ex.CopyModel(window=(16, 0), landmarks=32)
    alone = copy.deepcopy(sp)
    alone.attn.group = singles[rank]  # one rank, the whole sequence
    n = 200
    ex.train_sequence_parallel(DDP(sp), n, steps=3, rank=rank, world=world)
    ex.train_sequence_parallel(alone, n, steps=3, rank=0, world=1)
    _assert_same_parameters(sp, alone, "sequence-parallel")
    hkd.shutdown()


def test_distributed_training_equals_single_process_training():
    mp.spawn(_train_both, args=(2, free_port()), nprocs=2)


@pytest.mark.parametrize("mode", ["ddp", "sequence", "fid"])
def test_example_runs_under_torchrun(mode):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), EXAMPLE, "--mode", mode,
                           "--steps", "3", "--seq-len", "2048"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{mode}: 2 ranks, loss" in proc.stdout
