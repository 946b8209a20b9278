"""Training on several processes with torch.distributed: data-parallel HybridEncoder (DDP), and
a sequence-parallel attention model whose sequence is longer than one rank holds.

    torchrun --nproc-per-node 2 python/ddp_train.py --mode ddp --steps 20
    torchrun --nproc-per-node 2 python/ddp_train.py --mode sequence --seq-len 65536
    torchrun --nproc-per-node 2 python/ddp_train.py --mode fid --steps 20
    # several machines: the same command on each, with
    #   --nnodes M --node-rank i --rdzv-backend c10d --rdzv-endpoint HOST:29500

--mode ddp: every rank trains the same HybridEncoder on its slice of each global batch (a
generated task: are the tokens mostly from the upper half of the vocabulary?);
DistributedDataParallel averages the gradients.
--mode sequence: one long sequence (B=1, N=--seq-len) split contiguously over the ranks; each rank
holds N/P rows of a SequenceParallelSelfAttention model (window + landmarks over the whole
sequence, halos exchanged point-to-point), trained to recover each token from its window. Prints
the loss of the first and last step.
--mode fid: a small Fusion-in-Decoder T5 (random init) with DDP on the package's generated
multi-passage QA task, each rank reading its share of every batch of questions.
gloo on CPU, nccl when CUDA is there.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hybrid_kernels.distributed as hkd  # noqa: E402
from hybrid_kernels.models import HybridEncoder, HybridEncoderConfig  # noqa: E402

VOCAB = 64


def encoder_config() -> HybridEncoderConfig:
    return HybridEncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64, window=8, landmark_stride=16, num_landmarks=2,
                               segment_length=0, max_position=128, dropout=0.0)


class Classifier(nn.Module):
    """HybridEncoder + a linear head on the pooled state."""

    def __init__(self):
        super().__init__()
        self.encoder = HybridEncoder(encoder_config())
        self.head = nn.Linear(32, 2)

    def forward(self, ids):
        return self.head(self.encoder(ids).pooled)


def classification_batch(step: int, batch: int = 16, n: int = 64):
    """Label 1: tokens drawn mostly (70%) from the upper half of the vocabulary, else the lower."""
    g = torch.Generator().manual_seed(1000 + step)
    label = torch.rand(batch, generator=g) < 0.5
    upper = (torch.rand(batch, n, generator=g) < 0.7) == label[:, None]
    ids = torch.randint(1, VOCAB // 2, (batch, n), generator=g) + upper.long() * (VOCAB // 2)  # 0: padding
    return ids, label.long()


def sgd(params):
    return torch.optim.SGD(params, lr=0.05)


def adam(params):
    return torch.optim.Adam(params, lr=3e-3)


def train_ddp(model: nn.Module, steps: int, rank: int, world: int, optimizer=sgd):
    """Each rank takes rows rank::world of every global batch; returns the losses."""
    opt = optimizer(model.parameters())
    losses = []
    for step in range(steps):
        ids, y = classification_batch(step)
        loss = F.cross_entropy(model(ids[rank::world]), y[rank::world])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class CopyModel(nn.Module):
    """Embedding -> sequence-parallel attention -> vocabulary logits."""

    def __init__(self, window=(32, 0), landmarks=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.attn = hkd.SequenceParallelSelfAttention(32, 4, window=window, landmarks=landmarks,
                                                      causal=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):
        return self.head(self.attn(self.embed(ids)))


def copy_sequence(n: int, step: int):
    """Every position's target is its own token, to be found among the window's keys (there
    are no position embeddings: the layer must learn to match a query to its own key)."""
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(0, VOCAB, (1, n), generator=g)
    return ids, ids.clone()


def train_sequence_parallel(model: nn.Module, n: int, steps: int, rank: int, world: int,
                            optimizer=sgd):
    """Rank r holds rows [r n / P, (r + 1) n / P); DDP averages the parameter gradients, so each
    rank's loss is scaled by P to make the step that of the mean loss over the whole sequence."""
    lo, hi = rank * n // world, (rank + 1) * n // world
    opt = optimizer(model.parameters())
    losses = []
    for step in range(steps):
        ids, target = copy_sequence(n, step)
        logits = model(ids[:, lo:hi])
        total = F.cross_entropy(logits.reshape(-1, VOCAB), target[:, lo:hi].reshape(-1),
                                reduction="sum")
        loss = total * world / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / world)  # this rank's share of the mean loss
    return losses


def train_fid(steps: int, rank: int, world: int, batch: int = 8, passages: int = 5):
    """DDP FiDT5 on QATask: rank r takes questions r::world of every global batch."""
    import random
    from transformers import T5Config
    from hybrid_kernels.models import FiDT5
    from hybrid_kernels.training import QATask
    task = QATask(num_passages=passages)
    cfg = T5Config(vocab_size=len(task.tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_decoder_layers=2, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    model = DDP(FiDT5.from_config(cfg))
    opt = adam(model.parameters())
    rng, losses = random.Random(0), []
    for _ in range(steps):
        exs = [task.example(rng) for _ in range(batch)][rank::world]
        b = task.batch(exs, passages, random.Random(rng.random()))
        loss = model(b["input_ids"], b["attention_mask"], labels=b["labels"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["ddp", "sequence", "fid"], default="ddp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=16384)
    args = ap.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if args.mode == "ddp":
        losses = train_ddp(DDP(Classifier()), args.steps, rank, world, optimizer=adam)
    elif args.mode == "fid":
        losses = train_fid(args.steps, rank, world)
    else:
        model = DDP(CopyModel(landmarks=args.seq_len // 64))
        losses = train_sequence_parallel(model, args.seq_len, args.steps, rank, world, optimizer=adam)
    shares = torch.tensor([losses[0], losses[-1]])
    dist.all_reduce(shares)  # the ranks' losses (ddp, fid: means of equal shares) summed
    if args.mode != "sequence":
        shares /= world
    if rank == 0:
        print(f"{args.mode}: {world} ranks, loss {shares[0]:.3f} -> {shares[1]:.3f} "
              f"after {args.steps} steps")
    hkd.shutdown()  # no rank tears down the group while another still uses it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
