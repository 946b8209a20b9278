"""Train a small Fusion-in-Decoder T5 from scratch on CPU on the generated multi-passage QA task,
report exact match on held-out questions for n_passages in {1, 5, 10}, and time the FiD
cross-attention per decoding step with fp32 K/V vs the int8 K cache (int8 K, bf16 V) at 10 and 50
passages.

    PYTHONPATH=. python bench/train_fid.py                # full run (~15 min on 2 cores)
    PYTHONPATH=. python bench/train_fid.py --quick        # smoke run (~1 min)

Each question has k=10 passages, the answer in exactly one. The model trained and evaluated with
n passages reads n of the 10 drawn at random, so the 1-passage model sees a random single passage.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybrid_kernels.models.cross_kv import CrossKV, attend_dense_masked  # noqa: E402
from hybrid_kernels.models.fid import FiDT5, small_t5_config  # noqa: E402
from hybrid_kernels.training import QATask, TrainConfig, Trainer, exact_match  # noqa: E402

K_PASSAGES = 10
D_MODEL = int(os.environ.get('FID_D_MODEL', 64))


def batches(task: QATask, n: int, batch_size: int, seed: int, ramp_steps: int = 0):
    """Training batches. Curriculum (same for every n): during the first ``ramp_steps`` the gold
    passage is always read and the number of passages grows from 1 to n; afterwards the model
    reads n random passages of the k, exactly as at evaluation."""
    rng = random.Random(seed)
    step = 0
    while True:
        exs = [task.example(rng) for _ in range(batch_size)]
        if step < ramp_steps:
            m = 1 + (n - 1) * step // ramp_steps
            yield task.batch(exs, m, rng, include_gold=True)
        else:
            yield task.batch(exs, n, rng)
        step += 1


def fid_loss(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])["loss"]


def evaluate(model: FiDT5, task: QATask, n: int, num_questions: int, batch_size: int = 50):
    exs = task.examples(num_questions, "test")
    rng = random.Random(4321 + n)
    hits = 0
    for i in range(0, len(exs), batch_size):
        chunk = exs[i:i + batch_size]
        b = task.batch(chunk, n, rng, with_labels=False)
        out = model.generate(b["input_ids"], b["attention_mask"], max_new_tokens=4)
        for ex, ids in zip(chunk, out):
            hits += exact_match(task.tokenizer.decode(ids[1:].tolist()), ex.answer)
    return hits / len(exs)


def train_one(task, n, args):
    torch.manual_seed(0)
    model = FiDT5.from_config(small_t5_config(len(task.tokenizer), 32 if args.quick else D_MODEL))
    budget = args.seconds_per_passage * n + args.seconds_base
    cfg = TrainConfig(lr=args.lr, warmup_steps=min(100, args.steps // 10), max_steps=args.steps,
                      max_seconds=budget, log_every=max(10, args.steps // 20),
                      progress=not args.quiet)
    trainer = Trainer(model, fid_loss, cfg)
    t0 = time.perf_counter()
    trainer.train(batches(task, n, args.batch_size, seed=n, ramp_steps=args.ramp_steps))
    seconds = time.perf_counter() - t0
    model.eval()
    em = evaluate(model, task, n, args.eval_questions)
    last_loss = trainer.history[-1]["loss"] if trainer.history else float("nan")
    return model, {"n_passages": n, "exact_match": em, "steps": trainer.step,
                   "train_seconds": seconds, "final_loss": last_loss}


def _time(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def decode_speed(passages, layers=6, heads=8, d_kv=64, passage_len=128, beams=1, repeats=20):
    """Seconds per decoding step of the cross-attention of all layers (T5-small shapes)."""
    g = torch.Generator().manual_seed(0)
    N = passages * passage_len
    mask = torch.ones(1, N, dtype=torch.bool)
    mask.view(1, passages, passage_len)[:, :, passage_len - 16:] = False   # some padding
    kv = [(torch.randn(1, heads, N, d_kv, generator=g), torch.randn(1, heads, N, d_kv, generator=g))
          for _ in range(layers)]
    q = torch.randn(beams, heads, 1, d_kv, generator=g) * d_kv ** -0.5   # T5 folds 1/sqrt(d) into q
    caches = {name: [CrossKV(k, v, mask, passage_len, quant) for k, v in kv]
              for name, quant in (("fp32", None), ("int8", "int8"))}
    row = {"passages": passages, "keys": N}
    row["torch_fp32_ms"] = 1e3 * _time(lambda: [attend_dense_masked(q.view(1, heads, beams, d_kv), k, v, mask)
                                                 for k, v in kv], repeats)
    row["hk_fp32_ms"] = 1e3 * _time(lambda: [c.attend(q) for c in caches["fp32"]], repeats)
    row["hk_int8_kv_ms"] = 1e3 * _time(lambda: [c.attend(q) for c in caches["int8"]], repeats)
    row["fp32_kv_MB"] = sum(c.nbytes() for c in caches["fp32"]) / 2**20
    row["int8_kv_MB"] = sum(c.nbytes() for c in caches["int8"]) / 2**20
    ref = caches["fp32"][0].attend(q)
    row["int8_max_abs_err"] = float((caches["int8"][0].attend(q) - ref).abs().max())
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hard-negatives", type=float, default=0.0,
                    help="share of other-person distractors that state the asked relation")
    ap.add_argument("--ramp-steps", type=int, default=None, help="curriculum length (see batches)")
    ap.add_argument("--seconds-base", type=float, default=None, help="training budget per model: base + per-passage * n")
    ap.add_argument("--seconds-per-passage", type=float, default=None)
    ap.add_argument("--eval-questions", type=int, default=None)
    ap.add_argument("--passages", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--speed-passages", type=int, nargs="+", default=None)
    ap.add_argument("--save-dir", default=None, help="save the largest trained model + tokenizer here")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the machine is shared; more threads contend)")
    args = ap.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (30 if q else 1500)
    args.batch_size = args.batch_size or (8 if q else 16)
    args.ramp_steps = args.ramp_steps if args.ramp_steps is not None else args.steps // 3
    args.seconds_base = args.seconds_base if args.seconds_base is not None else (10 if q else 60)
    args.seconds_per_passage = (args.seconds_per_passage if args.seconds_per_passage is not None
                                else (1 if q else 40))
    args.eval_questions = args.eval_questions or (20 if q else 500)
    speed_passages = args.speed_passages or ([2] if q else [10, 50])
    torch.set_num_threads(args.threads)

    task = QATask(num_passages=K_PASSAGES, hard_negatives=args.hard_negatives)
    t_start = time.perf_counter()
    results = []
    for n in args.passages:
        model, r = train_one(task, n, args)
        results.append(r)
        if args.save_dir and n == max(args.passages):
            from hybrid_kernels.rag import save_tokenizer
            model.save_pretrained(args.save_dir)
            save_tokenizer(task.tokenizer, args.save_dir)
        print(f"n_passages={n:>2}: EM {100 * r['exact_match']:5.1f}%  ({r['steps']} steps, "
              f"{r['train_seconds']:.0f}s, final loss {r['final_loss']:.3f})", flush=True)
    print("\n| n_passages | exact match | train steps | train time |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n_passages']} | {100 * r['exact_match']:.1f}% | {r['steps']} | {r['train_seconds']:.0f} s |")

    speed = [decode_speed(p, passage_len=32 if q else 128, repeats=3 if q else 20) for p in speed_passages]
    print("\nFiD cross-attention per decoding step (6 layers, 8 heads, d_kv 64, 128-token passages, batch 1):")
    print("| passages | keys | torch fp32 | hk fp32 K/V | hk int8 K cache | int8/fp32 | K/V MB fp32 -> int8 | int8 max abs err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in speed:
        print(f"| {s['passages']} | {s['keys']} | {s['torch_fp32_ms']:.3f} ms | {s['hk_fp32_ms']:.3f} ms | "
              f"{s['hk_int8_kv_ms']:.3f} ms | {s['hk_int8_kv_ms'] / s['hk_fp32_ms']:.2f}x | "
              f"{s['fp32_kv_MB']:.1f} -> {s['int8_kv_MB']:.1f} | {s['int8_max_abs_err']:.1e} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exact_match": results, "decode_speed": speed, "args": vars(args)}, f, indent=1)
    return results, speed


if __name__ == "__main__":
    main()
