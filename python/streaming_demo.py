"""Streaming demo: an unbounded token stream through a small model in bounded memory.

    PYTHONPATH=. python python/streaming_demo.py [--tokens 20000]

1. streams random tokens in chunks of random sizes through a StreamingEncoder (4 sinks + a
   256-token window, INT8 cache) with a retention store, printing state memory as it goes;
2. checkpoints the stream, resumes it in a new session and checks the outputs are bit-equal;
3. shows a rejected chunk leaving the stream untouched;
4. retrieves the stored segments most similar to the last chunk;
5. if transformers>=5 is installed: generates past the window of a tiny random Llama with
   SinkWindowHFCache, in constant cache memory.
"""
from __future__ import annotations

import argparse

import torch

from hybrid_kernels.streaming import RetentionStore, StreamingEncoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20_000)
    args = p.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = StreamingEncoder(vocab_size=1000, dim=64, num_layers=2, num_heads=4, num_kv_heads=2).eval()

    def new_session():
        return model.new_session(num_sinks=4, window=256, cache_dtype="int8",
                                 retention=RetentionStore(64, capacity=32, segment_tokens=128,
                                                          eviction="least_retrieved"))

    session = new_session()
    print("1. streaming", args.tokens, "tokens in chunks of 1..300")
    next_report = 0
    while session.position < args.tokens:
        n = int(torch.randint(1, 301, (1,), generator=gen))
        model.feed(session, torch.randint(0, 1000, (1, n), generator=gen))
        if session.position >= next_report:
            print(f"   position {session.position:>7,d}  state {session.nbytes() / 1024:8.1f} KiB  "
                  f"segments stored {len(session.retention)}")
            next_report += args.tokens // 5

    print("2. checkpoint + resume")
    resumed = new_session()
    resumed.load_state_dict(session.state_dict())
    chunk = torch.randint(0, 1000, (1, 77), generator=gen)
    a, b = model.feed(session, chunk), model.feed(resumed, chunk)
    print("   resumed outputs bit-equal:", torch.equal(a, b))

    print("3. a bad chunk is rejected")
    before = session.position
    try:
        model.feed(session, torch.tensor([[5, 2000]]))
    except ValueError as exc:
        print("   ValueError:", exc)
    print("   position unchanged:", session.position == before)

    print("4. retrieval of what fell out of the window")
    for hit in session.retention.search(a[0].mean(0), k=3)[0]:
        print(f"   segment {hit['id']:>4}  tokens [{hit['start']}, {hit['end']})  cosine {hit['score']:.3f}")

    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("5. skipped (transformers>=5 not installed)")
        return
    from hybrid_kernels.integrations.hf_compat import cache_kwargs
    from hybrid_kernels.streaming.hf_cache import SinkWindowHFCache
    print("5. Hugging Face generate with a sink + window cache (4 + 60 tokens)")
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    llm = LlamaForCausalLM(cfg).eval()
    for new_tokens in (100, 300):
        cache = SinkWindowHFCache.from_model(llm, num_sinks=4, window=60)
        out = llm.generate(torch.randint(0, 1000, (1, 8), generator=gen),
                           **cache_kwargs(llm, cache), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        print(f"   generated {out.shape[1] - 8} tokens, cache holds {cache.layers[0].cached_length()} "
              f"per layer, {cache.nbytes() / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
