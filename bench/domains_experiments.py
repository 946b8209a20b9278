"""Token-only vs hybrid (typed fluxem spans) training on arithmetic and unit conversion.

    python bench/domains_experiments.py --config bench/configs/domains/arithmetic.json --out results/domains
    python bench/domains_experiments.py --config bench/configs/domains/units.json --out results/domains
    python bench/domains_experiments.py --all --out results/domains       # both, one plot
    python bench/domains_experiments.py --replot --out results/domains    # plot the saved JSONs

Both models are the same HybridEncoder (config "model"); they differ in input and output:

* token_only: characters as tokens; the pooled state feeds one 10-way digit classifier per
  answer digit (little-endian, zero-padded to the longest answer of any split).
* hybrid / hybrid_landmarks: the mixed stream (numbers, quantities and units as single fluxem
  span positions through learned 128 -> d heads, the rest as characters; the second runs the spans
  as landmark tokens). The pooled state picks one of three algebraic readouts of the two spans'
  raw encodings, computed in float64 and decoded with fluxem's layout: linear sum (a + b), log sum
  (a * b), log ratio (quantity in SI / target unit factor). It is trained from the answer alone:
  the target is the first readout that reproduces it (no operation label is given).

Exact match: the predicted integer equals the true answer (token_only: every digit right).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hybrid_kernels.domains import MixedStreamBatcher, MixedStreamEncoder  # noqa: E402
from hybrid_kernels.domains.encoding import (LINEAR_SCALE, NUMBER_LINEAR, NUMBER_LOG,  # noqa: E402
                                             QUANTITY_LOG, UNIT_LOG)
from hybrid_kernels.models import HybridEncoder, HybridEncoderConfig  # noqa: E402
from hybrid_kernels.training.qa_task import WordTokenizer  # noqa: E402

DOMAINS = ("number", "quantity", "unit")
READOUTS = ("linear_sum", "log_sum", "log_ratio")
MODELS = ("token_only", "hybrid", "hybrid_landmarks")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "domains")


# ---------------------------------------------------------------- data
def _operand(rng, lo, hi):
    n = rng.randint(lo, hi)
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)


def arithmetic_examples(cfg, rng, digits_key, size):
    out = []
    for _ in range(size):
        op = rng.choice(cfg["ops"])
        lo, hi = cfg[digits_key][op]
        a, b = _operand(rng, lo, hi), _operand(rng, lo, hi)
        out.append((f"{a} {op} {b} =", a + b if op == "+" else a * b))
    return out


def unit_pairs(cfg):
    return [(u1, u2, f1 / f2) for fam in cfg["units"].values() for u1, f1 in fam.items()
            for u2, f2 in fam.items() if f1 >= f2]


def unit_examples(cfg, rng, split, size):
    held = {tuple(p) for p in cfg["ood_pairs"]}
    pairs = [p for p in unit_pairs(cfg) if ((p[0], p[1]) in held) == (split == "ood")]
    lo, hi = cfg["values"]
    out = []
    for _ in range(size):
        u1, u2, ratio = rng.choice(pairs)
        v = rng.randint(lo, hi)
        out.append((f"{v} {u1} in {u2}", round(v * ratio)))
    return out


def make_splits(cfg):
    rng = random.Random(cfg["seed"])
    if cfg["task"] == "arithmetic":
        gen = lambda key, n: arithmetic_examples(cfg, rng, key, n)   # noqa: E731
        return {"train": gen("train_digits", cfg["train_size"]), "test_id": gen("train_digits", cfg["eval_size"]),
                "test_ood": gen("ood_digits", cfg["eval_size"])}
    if cfg["task"] == "units":
        return {name: unit_examples(cfg, rng, "ood" if name == "test_ood" else "id", n)
                for name, n in (("train", cfg["train_size"]), ("test_id", cfg["eval_size"]),
                                ("test_ood", cfg["eval_size"]))}
    raise ValueError(f"config task must be 'arithmetic' or 'units'; got {cfg['task']!r}")


def char_tokenizer(splits):
    chars = sorted({c for ex in splits.values() for text, _ in ex for c in text if not c.isspace()})
    tok = WordTokenizer(chars)
    return tok, (lambda s: tok.encode(" ".join(s), add_eos=False))


# ---------------------------------------------------------------- models
class TokenOnly(nn.Module):
    def __init__(self, encoder_cfg, digits):
        super().__init__()
        self.encoder = HybridEncoder(encoder_cfg)
        self.digits = digits
        self.head = nn.Linear(encoder_cfg.hidden_size, digits * 10)

    def forward(self, ids):
        return self.head(self.encoder(ids).pooled).view(len(ids), self.digits, 10)


class ReadoutHybrid(nn.Module):
    def __init__(self, encoder_cfg, landmarks):
        super().__init__()
        self.model = MixedStreamEncoder(HybridEncoder(encoder_cfg), DOMAINS, spans_as_landmarks=landmarks)
        self.head = nn.Linear(encoder_cfg.hidden_size, len(READOUTS))

    def forward(self, batch):
        return self.head(self.model(batch).pooled)


def readout_values(batch):
    """(B, 3) float64: the three readouts of each row's first two spans."""
    rows = []
    for b in range(len(batch.spans)):
        pos = batch.domain_mask[b].nonzero().flatten()
        if len(pos) < 2:
            rows.append([math.nan] * 3)
            continue
        e1, e2 = batch.encodings[b, pos[0]], batch.encodings[b, pos[1]]
        rows.append([float((e1[NUMBER_LINEAR] + e2[NUMBER_LINEAR]) * LINEAR_SCALE),
                     math.exp(float(e1[NUMBER_LOG] + e2[NUMBER_LOG])),
                     math.exp(float(e1[QUANTITY_LOG] - e2[UNIT_LOG]))])
    return torch.tensor(rows, dtype=torch.float64).round()


def readout_targets(values, answers):
    hit = values == torch.tensor(answers, dtype=torch.float64)[:, None]
    return torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(hit[:, 0], -100, dtype=torch.long))


def digit_targets(answers, digits):
    return torch.tensor([[(a // 10 ** i) % 10 for i in range(digits)] for a in answers])


# ---------------------------------------------------------------- training / scoring
def _batches(examples, size, rng):
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [examples[j] for j in order[i:i + size]]


def train_and_score(name, cfg, splits, tok, tokenize):
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"] + 1)
    enc_cfg = HybridEncoderConfig(vocab_size=len(tok), **cfg["model"])
    digits = max(len(str(a)) for ex in splits.values() for _, a in ex)
    if name == "token_only":
        model = TokenOnly(enc_cfg, digits)
        prep = lambda ex: torch.nn.utils.rnn.pad_sequence(   # noqa: E731
            [torch.tensor(tokenize(t)) for t, _ in ex], batch_first=True, padding_value=tok.pad_token_id)
    else:
        model = ReadoutHybrid(enc_cfg, landmarks=name == "hybrid_landmarks")
        batcher = MixedStreamBatcher(tokenize, DOMAINS, pad_token_id=tok.pad_token_id)
        prep = lambda ex: batcher([t for t, _ in ex])   # noqa: E731
    steps = cfg["steps"]["token_only" if name == "token_only" else "hybrid"]   # or max_train_seconds
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=steps, pct_start=0.1)
    t0, unlabelled = time.perf_counter(), 0
    model.train()
    done = 0
    for step, ex in zip(range(steps), _batches(splits["train"], cfg["batch_size"], rng)):
        if time.perf_counter() - t0 > cfg["max_train_seconds"]:
            break
        done = step + 1
        if step % 100 == 0:
            print(f"  {name} step {step}/{steps} {time.perf_counter() - t0:.0f}s", flush=True)
        answers = [a for _, a in ex]
        x = prep(ex)
        if name == "token_only":
            loss = F.cross_entropy(model(x).reshape(-1, 10), digit_targets(answers, digits).reshape(-1))
        else:
            target = readout_targets(readout_values(x), answers)
            unlabelled += int((target < 0).sum())
            loss = F.cross_entropy(model(x), target, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    scores = {}
    with torch.no_grad():
        for split in ("test_id", "test_ood"):
            ex = splits[split]
            answers = torch.tensor([a for _, a in ex])
            correct = 0
            for i in range(0, len(ex), 200):
                x = prep(ex[i:i + 200])
                gold = answers[i:i + 200]
                if name == "token_only":
                    pred = model(x).argmax(-1)
                    correct += int((pred == digit_targets(gold.tolist(), digits)).all(1).sum())
                else:
                    vals = readout_values(x)
                    pick = vals.gather(1, model(x).argmax(1, keepdim=True)).squeeze(1)
                    correct += int((pick == gold.double()).sum())
            scores[split] = correct / len(ex)
    return {"exact_match": scores, "train_seconds": round(train_s, 1), "steps": done,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_examples_without_readout": unlabelled}


def run_experiment(cfg, out_dir):
    splits = make_splits(cfg)
    tok, tokenize = char_tokenizer(splits)
    results = {"task": cfg["task"], "config": cfg, "cpu": _cpu(), "torch_threads": torch.get_num_threads(),
               "examples": {k: v[:3] for k, v in splits.items()}, "models": {}}
    for name in MODELS:
        results["models"][name] = train_and_score(name, cfg, splits, tok, tokenize)
        print(f"{cfg['task']:>10} {name:>16}: {results['models'][name]}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{cfg['task']}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def plot(all_results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 3.5), squeeze=False)
    for ax, res in zip(axes[0], all_results):
        for j, split in enumerate(("test_id", "test_ood")):
            vals = [res["models"][m]["exact_match"][split] for m in MODELS]
            ax.bar([i + 0.4 * j for i in range(len(MODELS))], vals, width=0.4, label=split)
        ax.set_xticks([i + 0.2 for i in range(len(MODELS))], MODELS)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{res['task']}: exact match")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", help="experiment config JSON (repeatable)")
    p.add_argument("--all", action="store_true", help="every config in bench/configs/domains")
    p.add_argument("--out", default="results/domains")
    p.add_argument("--replot", action="store_true", help="only redraw exact_match.png from --out's JSONs")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply training steps (smoke runs)")
    args = p.parse_args(argv)
    if args.replot:
        saved = []
        for task in ("arithmetic", "units"):
            path = os.path.join(args.out, f"{task}.json")
            if os.path.exists(path):
                with open(path) as f:
                    saved.append(json.load(f))
        if not saved:
            p.error(f"no arithmetic.json / units.json in {args.out}")
        plot(saved, os.path.join(args.out, "exact_match.png"))
        return saved
    paths = sorted(os.path.join(CONFIG_DIR, f) for f in os.listdir(CONFIG_DIR) if f.endswith(".json")) \
        if args.all else (args.config or [])
    if not paths:
        p.error("give --config PATH or --all")
    results = []
    for path in paths:
        with open(path) as f:
            cfg = json.load(f)
        cfg["steps"] = {k: max(1, int(v * args.steps_scale)) for k, v in cfg["steps"].items()}
        results.append(run_experiment(cfg, args.out))
    plot(results, os.path.join(args.out, "exact_match.png" if len(results) > 1 else f"{results[0]['task']}.png"))
    return results


if __name__ == "__main__":
    main()
