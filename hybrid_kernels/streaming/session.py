"""StreamingSession: attention over an unbounded token stream with a bounded KV cache.

Semantics (S = ``num_sinks``, W = ``window``). Stream position r (0-based) attends to

* the sink tokens 0 .. S-1 (the first S tokens of the stream), and
* the W most recent tokens and itself: r - W <= j <= r,

always causally (j <= r). Over the whole stream this is exactly
``hk.attention(q, k, v, causal=True, window=(W, 0), landmarks=torch.arange(S))``. hk's landmarks
are two-way (a landmark *query* row sees every key), but under ``causal`` a sink row r < S can
only see keys j <= r < S, all of which are sinks anyway; so two-way and one-way ("sinks as keys
only") landmarks give the same visibility (tests/test_streaming.py checks the masks are equal).

Each chunk of n tokens is one call per layer with q = the chunk (Nq = n) and k/v = cache + chunk
(Nk = len(cache) + n), with the same ``causal=True, window=(W, 0)`` and the sink slots
0 .. min(S, Nk)-1 as landmarks; hk's bottom-right alignment puts query i at key position
len(cache) + i. The cache keeps exactly what any later query can see (S sinks + W recent), so
the chunked outputs equal the whole-stream call for every chunking, up to fp rounding.

Positions (``rope_theta`` set). Keys are cached before rotation and rotated at attention time by
positions re-based inside the cache, as StreamingLLM does, so angles stay bounded by S + W + n
however long the stream is. With one-token steps StreamingLLM numbers the cache slots 0..S+W-1
and the query S+W: window key j is at distance r - j and sink s at distance S + W - s. Numbering
slots per *chunk* would make a query's distance to the sinks depend on where the chunk boundary
fell, so we use the per-query form of the same convention, which is chunking-invariant:

* a window key j (r - W <= j <= r) is at its true distance r - j;
* a sink s outside the window is at distance min(r, S + W) - s, i.e. the sinks sit just before
  the query's window (until the stream is longer than S + W, that is the true distance too).

A chunk is therefore computed as (a) rows r <= S + W: one call at true positions (nothing has
been evicted yet), and (b) rows r > S + W: a window call (keys rotated by their slot in
[recent ‖ chunk], queries by theirs) and a sink call (sink s at position s, every query at
position S + W), merged through their log-sum-exp. :func:`.equivalence.whole_stream_attention`
is the same convention over the whole stream.

Transactions: a chunk is staged layer by layer (:meth:`attend`) and committed at the end; a chunk
that fails validation, or raises anywhere, leaves the session exactly as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .. import api as _api
from .cache import CACHE_DTYPES, KVCodec, SinkWindowCache
from .positions import apply_rope

__all__ = ["StreamingSession", "merge_attention"]

_STATE_FORMAT = 1
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}" + (" or None" if allow_none else "")
                         + f"; got {value!r}")


def merge_attention(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> Tensor:
    """Combine two attentions over disjoint key sets from their outputs and log-sum-exps."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
    den = w1 + w2
    out = (o1.float() * w1 + o2.float() * w2) / torch.where(den > 0, den, torch.ones_like(den))
    return out.to(o1.dtype)


class StreamingSession:
    """Bounded-memory attention state for a stream fed in chunks of any size.

    Args:
        num_heads, head_dim: query heads Hq and head dim D.
        num_kv_heads: key/value heads Hk (Hq % Hk == 0); default Hq.
        head_dim_v: value head dim; default D.
        num_layers: caches kept (one per attention layer of the model using the session).
        num_sinks: S, the first S tokens of the stream stay visible forever.
        window: W, the number of most recent tokens kept; None = keep everything (the full-cache
            baseline; then num_sinks must be 0).
        rope_theta: None (q/k used as given) or the RoPE base; then q/k are passed *unrotated*
            and rotated by re-based positions (module docstring).
        cache_dtype: "float32" | "float16" | "bfloat16" | "int8" (per-block scales, see .cache).
        int8_block: channels per INT8 scale.
        backend: passed to ``hk.attention``.
        retention: optional :class:`.retention.RetentionStore` fed by the encoder; it is part of
            :meth:`state_dict`.
    """

    def __init__(self, *, num_heads: int, head_dim: int, num_kv_heads: Optional[int] = None,
                 head_dim_v: Optional[int] = None, num_layers: int = 1, num_sinks: int = 4,
                 window: Optional[int] = 256, rope_theta: Optional[float] = None,
                 cache_dtype: str = "float32", int8_block: int = 32, backend: str = "auto",
                 retention=None):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        for name, value, lo in (("num_heads", num_heads, 1), ("head_dim", head_dim, 1),
                                ("num_kv_heads", num_kv_heads, 1), ("head_dim_v", head_dim_v, 1),
                                ("num_layers", num_layers, 1), ("num_sinks", num_sinks, 0)):
            _check_int(name, value, lo)
        _check_int("window", window, 0, allow_none=True)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if window is None and num_sinks:
            raise ValueError("window=None keeps every token (full cache); set num_sinks=0 with it")
        if rope_theta is not None:
            if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
                raise ValueError(f"rope_theta must be a positive number or None; got {rope_theta!r}")
            if head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim; got head_dim={head_dim}")
            rope_theta = float(rope_theta)
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}; got {cache_dtype!r}")
        if backend not in ("auto", "cpu", "triton", "cuda", "reference"):
            raise ValueError(f"backend must be 'auto', 'cpu', 'triton', 'cuda' or 'reference'; got {backend!r}")
        self.config: Dict[str, Any] = dict(
            num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
            head_dim_v=head_dim_v, num_layers=num_layers, num_sinks=num_sinks, window=window,
            rope_theta=rope_theta, cache_dtype=cache_dtype, int8_block=int8_block)
        self.backend = backend
        self.codec = KVCodec(cache_dtype, int8_block)
        self.retention = retention
        self.position = 0                      # tokens consumed so far
        self._layers: Optional[List[SinkWindowCache]] = None
        self._batch: Optional[int] = None
        self._pending: Optional[Dict[str, Any]] = None

    # -- configuration shortcuts ---------------------------------------------------------------
    @property
    def num_sinks(self) -> int:
        return self.config["num_sinks"]

    @property
    def window(self) -> Optional[int]:
        return self.config["window"]

    @property
    def num_layers(self) -> int:
        return self.config["num_layers"]

    @property
    def batch_size(self) -> Optional[int]:
        return self._batch

    def cache(self, layer: int = 0) -> Optional[SinkWindowCache]:
        return None if self._layers is None else self._layers[layer]

    # -- validation ----------------------------------------------------------------------------
    def check_chunk(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Raise TypeError/ValueError naming the argument if (q, k, v) is not a valid next chunk."""
        c = self.config
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D (B, H, n, D); got shape {tuple(t.shape)}")
            if t.dtype not in _FLOAT:
                raise TypeError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
        expect = {"q": (c["num_heads"], c["head_dim"]), "k": (c["num_kv_heads"], c["head_dim"]),
                  "v": (c["num_kv_heads"], c["head_dim_v"])}
        B, n = q.shape[0], q.shape[2]
        for name, t in (("q", q), ("k", k), ("v", v)):
            H, D = expect[name]
            if t.shape[1] != H or t.shape[3] != D or t.shape[0] != B or t.shape[2] != n:
                raise ValueError(f"{name} must have shape (B={B}, {H}, n={n}, {D}); got {tuple(t.shape)}")
        if n == 0:
            raise ValueError("the chunk is empty (n = 0 tokens)")
        if B == 0:
            raise ValueError("the chunk has batch size 0")
        if self._batch is not None and B != self._batch:
            raise ValueError(f"batch size {B} differs from the stream's batch size {self._batch}")
        device = self._device()
        if device is not None and q.device != device:
            raise ValueError(f"the chunk is on {q.device} but the stream's cache is on {device}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf; the chunk was rejected and the "
                                 f"stream state is unchanged")

    def _device(self) -> Optional[torch.device]:
        return None if self._layers is None else self._layers[0].sink_k[0].device

    # -- transactions --------------------------------------------------------------------------
    def begin(self, num_tokens: int) -> None:
        """Start staging a chunk of ``num_tokens`` tokens."""
        if self._pending is not None:
            raise RuntimeError("a chunk is already in progress; commit() or abort() it first")
        _check_int("num_tokens", num_tokens, 1)
        self._pending = {"n": num_tokens, "layers": {}}

    def abort(self) -> None:
        """Drop the staged chunk; the session is as before :meth:`begin`."""
        self._pending = None

    def commit(self) -> None:
        """Make the staged chunk part of the stream (every layer must have attended)."""
        p = self._pending
        if p is None:
            raise RuntimeError("commit() without begin()")
        missing = [i for i in range(self.num_layers) if i not in p["layers"]]
        if missing:
            raise RuntimeError(f"commit(): layers {missing} did not attend this chunk")
        self._layers = [p["layers"][i] for i in range(self.num_layers)]
        self._batch = p["batch"]
        self.position += p["n"]
        self._pending = None

    @contextmanager
    def chunk(self, num_tokens: int):
        """``with session.chunk(n): ...attend(layer, q, k, v)...`` commits on success and leaves
        the session unchanged if the block raises."""
        self.begin(num_tokens)
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.commit()

    def feed(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One chunk through a one-layer session: validate, attend, commit. Returns (B, Hq, n, Dv)."""
        if self.num_layers != 1:
            raise RuntimeError(f"feed() is for one-layer sessions; this one has {self.num_layers} "
                               f"layers: use `with session.chunk(n): session.attend(layer, q, k, v)`")
        self.check_chunk(q, k, v)
        with self.chunk(q.shape[2]):
            return self.attend(0, q, k, v)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the chunk (q, k, v: (B, H, n, D), pre-RoPE) for ``layer``; stages the
        layer's next cache state. Call inside :meth:`chunk` (or between begin/commit)."""
        p = self._pending
        if p is None:
            raise RuntimeError("attend() outside a chunk: use `with session.chunk(n):`")
        _check_int("layer", layer, 0)
        if layer >= self.num_layers:
            raise ValueError(f"layer must be < num_layers={self.num_layers}; got {layer}")
        if layer in p["layers"]:
            raise RuntimeError(f"layer {layer} already attended this chunk")
        self.check_chunk(q, k, v)
        if q.shape[2] != p["n"]:
            raise ValueError(f"this chunk has {p['n']} tokens but q has {q.shape[2]}")
        if "batch" in p and p["batch"] != q.shape[0]:
            raise ValueError(f"batch size {q.shape[0]} differs from this chunk's {p['batch']}")
        p["batch"] = q.shape[0]
        c = self.config
        cache = (self._layers[layer] if self._layers is not None else SinkWindowCache.empty(
            c["num_sinks"], c["window"], self.codec, q.shape[0], c["num_kv_heads"], c["head_dim"],
            c["head_dim_v"], q.device))
        k_parts, v_parts = self.codec.encode(k), self.codec.encode(v)
        # The chunk's own keys/values at storage precision, so every token is seen identically
        # whether it is in the current chunk or in the cache.
        kc, vc = self.codec.decode(k_parts, q.dtype), self.codec.decode(v_parts, q.dtype)
        out = self._attention(cache, q, kc, vc)
        p["layers"][layer] = cache.appended(k_parts, v_parts)
        return out

    # -- the attention of one chunk ------------------------------------------------------------
    def _call(self, q, k, v, **kw):
        return _api.attention(q, k, v, causal=kw.pop("causal", True), backend=self.backend, **kw)

    def _attention(self, cache: SinkWindowCache, q: Tensor, kc: Tensor, vc: Tensor) -> Tensor:
        S, W, theta = self.num_sinks, self.window, self.config["rope_theta"]
        P0, n, dev = self.position, q.shape[2], q.device
        ks, vs = cache.sinks(q.dtype)
        kw, vw = cache.recent(q.dtype)
        if W is None:  # full cache: every token kept, true positions
            keys, vals = torch.cat([kw, kc], 2), torch.cat([vw, vc], 2)
            if theta is not None:
                q = apply_rope(q, torch.arange(P0, P0 + n, device=dev), theta)
                keys = apply_rope(keys, torch.arange(keys.shape[2], device=dev), theta)
            return self._call(q, keys, vals)
        if theta is None:
            keys, vals = torch.cat([ks, kw, kc], 2), torch.cat([vs, vw, vc], 2)
            return self._call(q, keys, vals, window=(W, 0), landmarks=self._landmarks(keys, dev))
        outs = []
        head = max(0, min(n, S + W + 1 - P0))   # rows r <= S + W: nothing evicted yet
        if head:
            keys = torch.cat([ks, kw, kc[:, :, :head]], 2)
            vals = torch.cat([vs, vw, vc[:, :, :head]], 2)
            qh = apply_rope(q[:, :, :head], torch.arange(P0, P0 + head, device=dev), theta)
            keys = apply_rope(keys, torch.arange(keys.shape[2], device=dev), theta)
            outs.append(self._call(qh, keys, vals, window=(W, 0),
                                   landmarks=self._landmarks(keys, dev)))
        if head < n:
            outs.append(self._tail(q[:, :, head:], P0 + head, ks, vs, kw, vw, kc, vc))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def _tail(self, q, r0, ks, vs, kw, vw, kc, vc) -> Tensor:
        """Rows r0.. (> S + W): window keys at slot positions, sinks before the window."""
        S, W, theta = self.num_sinks, self.window, self.config["rope_theta"]
        P0, dev = self.position, q.device
        skip = max(0, S - P0)            # chunk tokens that are still sinks
        keys = torch.cat([kw, kc[:, :, skip:]], 2)
        vals = torch.cat([vw, vc[:, :, skip:]], 2)
        start = P0 + skip - kw.shape[2]  # stream position of keys[0]; the keys are contiguous
        m = q.shape[2]
        qa = apply_rope(q, torch.arange(r0 - start, r0 - start + m, device=dev), theta)
        keys = apply_rope(keys, torch.arange(keys.shape[2], device=dev), theta)
        out, lse = self._call(qa, keys, vals, window=(W, 0), return_lse=True)
        if S == 0:
            return out
        sk = torch.cat([ks, kc[:, :, :skip]], 2)
        sv = torch.cat([vs, vc[:, :, :skip]], 2)
        qb = apply_rope(q, torch.full((m,), S + W, device=dev), theta)
        sk = apply_rope(sk, torch.arange(S, device=dev), theta)
        out_s, lse_s = self._call(qb, sk, sv, causal=False, return_lse=True)
        return merge_attention(out, lse, out_s, lse_s)

    def _landmarks(self, keys: Tensor, device) -> Optional[Tensor]:
        g = min(self.num_sinks, keys.shape[2])
        return torch.arange(g, device=device) if g else None

    # -- memory and checkpoints ----------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of tensor storage held by the stream state (caches + retention store)."""
        total = sum(c.nbytes() for c in self._layers) if self._layers else 0
        if self.retention is not None:
            total += self.retention.nbytes()
        return total

    def reset(self) -> None:
        self.position, self._layers, self._batch, self._pending = 0, None, None, None
        if self.retention is not None:
            self.retention.reset()

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume the stream bit-exactly (tensors are cloned)."""
        if self._pending is not None:
            raise RuntimeError("state_dict() during a chunk; commit() or abort() first")
        layers = None if self._layers is None else [
            {name: t.clone() for name, t in c.tensors().items()} for c in self._layers]
        return {"format": _STATE_FORMAT, "config": dict(self.config), "position": self.position,
                "batch": self._batch, "layers": layers,
                "retention": None if self.retention is None else self.retention.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; on any mismatch raise ValueError and change nothing."""
        if self._pending is not None:
            raise RuntimeError("load_state_dict() during a chunk; commit() or abort() first")
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state must be a dict from StreamingSession.state_dict() "
                             f"(format {_STATE_FORMAT})")
        if state.get("config") != self.config:
            raise ValueError(f"state was saved with config {state.get('config')} but this session "
                             f"has {self.config}")
        position, batch, layers = state["position"], state["batch"], state["layers"]
        _check_int("state['position']", position, 0)
        caches = None
        if layers is not None:
            if len(layers) != self.num_layers:
                raise ValueError(f"state has {len(layers)} layers; expected {self.num_layers}")
            caches = [self._restore_layer(t, position, batch) for t in layers]
        elif position:
            raise ValueError("state has a nonzero position but no cache tensors")
        if (self.retention is None) != (state.get("retention") is None):
            raise ValueError("state and session disagree on having a retention store")
        if self.retention is not None:
            self.retention.load_state_dict(state["retention"])  # validates before changing
        self.position, self._batch, self._layers = position, batch, caches

    def _restore_layer(self, tensors: Dict[str, Tensor], position: int, batch) -> SinkWindowCache:
        c = self.config
        first = next(iter(tensors.values()))
        template = SinkWindowCache.empty(c["num_sinks"], c["window"], self.codec, batch or 1,
                                         c["num_kv_heads"], c["head_dim"], c["head_dim_v"],
                                         first.device)
        cache = template.with_tensors(tensors)
        expect_sinks = min(position, c["num_sinks"])
        rest = position - expect_sinks
        expect_win = rest if c["window"] is None else min(rest, c["window"])
        for got, ref in zip(cache.tensors().items(), template.tensors().values()):
            name, t = got
            want_len = expect_sinks if name.startswith("sink") else expect_win
            if (t.dtype != ref.dtype or t.dim() != 4 or t.shape[0] != batch
                    or t.shape[1] != ref.shape[1] or t.shape[3] != ref.shape[3]
                    or t.shape[2] != want_len):
                raise ValueError(f"cache tensor {name!r} has dtype {t.dtype} shape {tuple(t.shape)}; "
                                 f"expected dtype {ref.dtype} shape ({batch}, {ref.shape[1]}, "
                                 f"{want_len}, {ref.shape[3]})")
        return cache
