"""Whole-model prefill of real architectures: their own attention pattern on hybrid_kernels vs the
model's default attention (SDPA with transformers' materialized mask), in one run.

    PYTHONPATH=. python python/models_on_kernels.py                      # 8192 and 16384 tokens
    PYTHONPATH=. python python/models_on_kernels.py --seq-lens 8192 --models mistral
    PYTHONPATH=. python python/models_on_kernels.py --quick               # tiny smoke run
    PYTHONPATH=. python python/models_on_kernels.py --decode --zoo        # generation steps

Nothing about the models changes: a Mistral-like decoder keeps its causal sliding window (512),
a ModernBERT-like encoder its alternating local (128) and global layers. Random-init weights
(transformers builds them from a config, offline); the same model object is timed with
``attn_implementation="sdpa"`` and with ``"hybrid_kernels"``, alternately, so drift of the
machine's speed hits both. Prints one table (median ms, speedup) and the outputs' agreement.

``--decode`` times generation instead (decoder models only): a prompt of each --seq-lens length is
prefilled once into a KV cache (``--cache dynamic``, transformers' default, or ``static``), then
--new-tokens one-token steps run on a fresh copy of it with either attention; the table shows
milliseconds per generated token, and the agreement of the first step's hidden states.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hybrid_kernels as hk  # noqa: E402
from hybrid_kernels.integrations.hf_compat import cache_kwargs, output_cache  # noqa: E402
from hybrid_kernels.bench.env import device_name  # noqa: E402


def mistral_like(quick: bool):
    from transformers import MistralConfig, MistralModel
    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=16) if quick else dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=4, sliding_window=512)
    return MistralModel(MistralConfig(vocab_size=1000, max_position_embeddings=32768, **dims))


def modernbert_like(quick: bool):
    from transformers import ModernBertConfig, ModernBertModel
    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                local_attention=16) if quick else dict(
        hidden_size=768, intermediate_size=1152, num_hidden_layers=3, num_attention_heads=12,
        local_attention=128)
    return ModernBertModel(ModernBertConfig(
        vocab_size=1000, max_position_embeddings=32768, global_attn_every_n_layers=3,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **dims))


MODELS = {"mistral": mistral_like, "modernbert": modernbert_like}


def zoo(quick: bool):
    """Every architecture the integration covers, at one mid size (2 layers, 8 query / 2 kv
    heads of 64, sliding windows of 256 where the model has them), random init: name -> model."""
    import transformers as tf
    h, w = (64, 16) if quick else (512, 256)
    common = dict(vocab_size=1000, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    alternating = ["sliding_attention", "full_attention"]
    head = dict(head_dim=h // 8)
    return {
        "llama": lambda: tf.LlamaModel(tf.LlamaConfig(**common)),
        "mistral": lambda: tf.MistralModel(tf.MistralConfig(**common, sliding_window=w)),
        "qwen2": lambda: tf.Qwen2Model(tf.Qwen2Config(**common, use_sliding_window=True,
                                                       sliding_window=w, max_window_layers=0)),
        "phi3": lambda: tf.Phi3Model(tf.Phi3Config(**common, sliding_window=w)),
        "gemma2": lambda: tf.Gemma2Model(tf.Gemma2Config(**common, **head, sliding_window=w,
                                                          attn_logit_softcapping=50.0,
                                                          layer_types=alternating)),
        "gemma3": lambda: tf.Gemma3TextModel(tf.Gemma3TextConfig(**common, **head, sliding_window=w,
                                                                  layer_types=alternating)),
        "cohere2": lambda: tf.Cohere2Model(tf.Cohere2Config(**common, sliding_window=w,
                                                             layer_types=alternating)),
        "gpt_oss": lambda: tf.GptOssModel(tf.GptOssConfig(**common, **head, sliding_window=w,
                                                           num_local_experts=4,
                                                           num_experts_per_tok=2,
                                                           layer_types=alternating)),
        "modernbert": lambda: modernbert_like(quick),
        "bert": lambda: tf.BertModel(tf.BertConfig(vocab_size=1000, hidden_size=h,
                                                   num_hidden_layers=2, num_attention_heads=8,
                                                   intermediate_size=2 * h,
                                                   max_position_embeddings=32768)),
        "t5_encoder": lambda: tf.T5EncoderModel(tf.T5Config(vocab_size=1000, d_model=h, d_kv=64,
                                                            d_ff=2 * h, num_layers=2, num_heads=8)),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--zoo", action="store_true",
                   help="instead: every covered architecture at a mid size (see zoo()), "
                        "default --seq-lens 4096")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times both)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny models, 256 tokens, 1 round")
    p.add_argument("--decode", action="store_true",
                   help="time one-token generation steps after a prompt of each length instead")
    p.add_argument("--new-tokens", type=int, default=16, help="steps per timed round (--decode)")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="--decode: transformers' default cache (a new K/V tensor per step) or a "
                        "StaticCache (written in place)")
    args = p.parse_args(argv)
    if args.zoo and args.seq_lens == [8192, 16384]:
        args.seq_lens = [4096]
    if args.quick:
        args.seq_lens, args.repeats = [256], 1
    return args


def _forward(model, ids, am):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=am).last_hidden_state


def compare_attention(name: str, model, seq_len: int, repeats: int, run) -> dict:
    """The model's default attention (what transformers picks: SDPA, or eager for models without
    SDPA support such as Gemma 2 and GPT-OSS) against hybrid_kernels, timed alternately.
    ``run(warmup)`` does one timed unit of work with the attention set now and returns (output,
    seconds): first once each as the warm-up whose outputs are compared, then ``repeats`` rounds."""
    kernel = hk.integrations.transformers.register()
    default = model.config._attn_implementation
    impls = {"default": default, "hybrid_kernels": kernel}
    outs, times = {}, {k: [] for k in impls}
    for label, impl in impls.items():
        model.set_attn_implementation(impl)
        outs[label] = run(True)[0].float()
    for _ in range(repeats):
        for label, impl in impls.items():
            model.set_attn_implementation(impl)
            times[label].append(run(False)[1])
    model.set_attn_implementation(default)
    ref, got = outs["default"], outs["hybrid_kernels"]
    t_ref, t_hk = statistics.median(times["default"]), statistics.median(times["hybrid_kernels"])
    return {"model": name, "default": default, "seq_len": seq_len, "default_ms": t_ref * 1e3,
            "hybrid_ms": t_hk * 1e3, "speedup": t_ref / t_hk,
            "max_rel_diff": ((got - ref).abs().max() / ref.abs().max()).item()}


def measure(name: str, model, seq_len: int, repeats: int) -> dict:
    """Median prefill milliseconds of a ``seq_len``-token input, default attention and hk."""
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len))
    am = torch.ones_like(ids)

    def prefill(warmup):
        t0 = time.perf_counter()
        out = _forward(model, ids, am)
        return out, time.perf_counter() - t0
    return compare_attention(name, model, seq_len, repeats, prefill)


ENCODERS = ("modernbert", "bert", "t5_encoder")


def _decode_steps(model, cache, token, steps: int, start: int):
    """Runs ``steps`` one-token forwards on ``cache`` (written in place) at positions ``start``,
    ``start + 1``, ...; the first step's output."""
    first = None
    with torch.inference_mode():
        for s in range(steps):
            out = model(input_ids=token, use_cache=True, cache_position=torch.tensor([start + s]),
                        **cache_kwargs(model, cache)).last_hidden_state
            first = out if first is None else first
    return first


def _prompt_cache(model, ids, kind: str, room: int):
    """The KV cache after prefilling ``ids``: transformers' default (dynamic: every step
    concatenates a new K/V tensor) or a static one with ``room`` free slots (written in place)."""
    with torch.inference_mode():
        if kind == "dynamic":
            return output_cache(model(input_ids=ids, use_cache=True))
        from transformers import StaticCache
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + room)
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        return cache


def measure_decode(name: str, model, seq_len: int, repeats: int, steps: int,
                   cache_kind: str = "dynamic") -> dict:
    """Median milliseconds per generated token after a prompt of ``seq_len`` tokens, with the
    model's default attention and with hybrid_kernels (each from its own copy of one prefilled
    cache, so both decode the same context; the copy is not timed)."""
    import copy
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len))
    token = torch.randint(3, model.config.vocab_size, (1, 1))
    prompt_cache = _prompt_cache(model, ids, cache_kind, steps + 1)

    def generate(warmup):
        n = 1 if warmup else steps  # the warm-up's first step is the output compared
        cache = copy.deepcopy(prompt_cache)
        t0 = time.perf_counter()
        out = _decode_steps(model, cache, token, n, seq_len)
        return out, (time.perf_counter() - t0) / n
    row = compare_attention(name, model, seq_len, repeats, generate)
    row["cache"] = cache_kind
    return row


def main(argv=None) -> list:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    try:
        isa = hk.backends.cpu.load_module().selected_isa()
    except ImportError as exc:
        isa = f"none ({exc})"
    print(f"{device_name('cpu')}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.dtype}, CPU kernel ISA {isa}")
    steps = 2 if args.quick else args.new_tokens
    if args.decode:
        print(f"one-token decode after a prompt of 'tokens', {args.cache} cache, ms per generated "
              f"token ({steps} steps per round, median of {args.repeats} rounds)")
    print(f"{'model':<11} {'default':>8} {'tokens':>7} {'default ms':>11} {'hk ms':>9} "
          f"{'speedup':>8} {'max rel diff':>13}")
    builders = zoo(args.quick) if args.zoo else {n: (lambda n=n: MODELS[n](args.quick)) for n in args.models}
    if args.decode:
        builders = {n: b for n, b in builders.items() if n not in ENCODERS}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build().eval().to(dtype)
        for n in args.seq_lens:
            row = (measure_decode(name, model, n, args.repeats, steps, args.cache)
                   if args.decode else measure(name, model, n, args.repeats))
            row["mode"] = "decode" if args.decode else "prefill"
            rows.append(row)
            print(f"{name:<11} {row['default']:>8} {n:>7} {row['default_ms']:>11.1f} "
                  f"{row['hybrid_ms']:>9.1f} {row['speedup']:>7.2f}x {row['max_rel_diff']:>13.2e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": device_name("cpu"), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
