"""INT8 quantization of q and k for the SageAttention-style int8 forward, and its exact oracle.

The one INT8 definition
-----------------------
Every backend's ``quant="int8"`` (cpu, cuda, triton, reference) computes exactly this; the
constants below are the only place its parameters live, and :func:`quantize_qk` is its
executable form (the backends' quantized integers and scales are bit-equal to it):

* Blocks: Q and K are quantized in blocks of ``QUANT_BLOCK`` (64) consecutive tokens per
  (batch, head), blocks starting at token 0 (the last one may be short); one float32 scale per
  block.
* Smoothing: K's mean over the *real* (non-padded) keys, per (batch, kv head), float32
  (:func:`smoothing_mean`), is subtracted from K before quantization; padded keys quantize to
  zero (and so do not enter their block's absmax).
* Scale: ``scale = fl32(absmax / 127)`` with absmax the max of ``|x - mean|`` (``|x|`` for Q) over
  the block in float32; an all-zero block gets scale 1 (its integers are zeros).
* Integers: ``x8 = round_half_to_even(fl32(fl32(x - mean) * fl32(1 / scale)))`` (``QUANT_ROUNDING``),
  all float32 with IEEE round-to-nearest; |x8| <= 127.
* Scores: ``scale_softmax * q_scale_i * k_scale_j * (q8_i . k8_j)`` with the integer dot product
  exact (int32 accumulation). Those are the scores of the smoothed K: smaller than the exact ones
  by ``shift_i = scale_softmax * q_i . mean`` (q unquantized, float32). Softmax in float32.
* Score modifiers (where a backend takes them with int8): they act on the exact scores, i.e.
  ``shift_i`` is added back before the softcap; the bias table is shift-invariant.
* lse: every backend returns the lse of the exact (unsmoothed) scores: the smoothed scores' lse
  plus ``shift_i`` (``smoothing_lse_offset`` below), or directly when the shift was added back.
* PV: P (and V) in low precision with float32 accumulation; the precision is the backend's
  (CPU: bf16 for every dtype; Triton/CUDA: V's dtype), the only place backends may differ.

The rest of this module:

* :func:`quantize_qk` turns q and k into int8 as above. ``q_block`` / ``k_block`` default to
  ``QUANT_BLOCK``; other values are for experiments and tests only (no backend uses them).
  The softmax scale is not folded in; the kernels multiply by it.
* :func:`int8_reference` emulates an int8 kernel: exact integer dot products, then the scales,
  in float64 on top of :mod:`hybrid_kernels.reference`, and PV with P and V rounded to bf16
  (SageAttention's PV precision, which the CPU kernels use for every input dtype), fp16 (Triton
  with fp16 V) or, with ``pv_dtype=torch.float64``, exact. The kernels are tested against the
  exact emulation with a tolerance derived from the bf16 one (tests/oracle.py).

Note on lse: :func:`int8_reference` returns the lse of the smoothed scores, i.e. the exact lse
minus ``scale * q . mean(k)``. ``quantize_qk(..., return_k_mean=True)`` returns the mean so a
caller can add it back (the backends do).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import masked_softmax_lse, visibility_mask

__all__ = ["QUANT_BLOCK", "QUANT_QMAX", "QUANT_ROUNDING", "quantize_qk", "smoothing_mean",
           "int8_reference", "dequantize", "smoothing_lse_offset"]

# ---- The INT8 definition's parameters (see the module docstring); every backend reads these. ----
QUANT_BLOCK = 64                   # tokens per scale block, for Q and for K
QUANT_QMAX = 127                   # scale = absmax / QUANT_QMAX; integers in [-127, 127]
QUANT_ROUNDING = "half_to_even"    # round-to-nearest, ties to even (IEEE default, rint)


def _check_block(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _check_inputs(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor]) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D)")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B and D")
    if q.device != k.device:
        raise ValueError("q and k must be on the same device")
    if key_padding_mask is not None:
        if (not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool
                or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])):
            raise ValueError(f"key_padding_mask must be a bool tensor of shape "
                             f"{(k.shape[0], k.shape[2])}")


# Rounding by adding 1.5 * 2^23: the float32 sum is round-to-nearest-even(y) + MAGIC, and the low
# byte of its bit pattern is that integer as int8 (|y| <= 127). It fuses rounding and conversion.
_MAGIC = 12582912.0
# Elements per chunk of the quantize pass (about 1 MiB of float32): small temporaries are reused
# from the heap, while whole-tensor temporaries would be fresh mmaps paid for in page faults.
_CHUNK = 1 << 20


def _block_absmax(x: Tensor, block: int, shift: Optional[Tensor]) -> Tensor:
    """max |x - shift| per block of ``block`` tokens: (B, H, nb) float32. Uses per-block max/min
    (monotone rounding makes max(x - s) == max(x) - s exactly), so x - shift is never built."""
    B, H, N, D = x.shape
    nfull = N // block
    parts = [x.new_zeros(B, H, 0)]
    for lo, hi, nb in ((0, nfull * block, nfull), (nfull * block, N, 1 if N % block else 0)):
        if nb == 0:
            continue
        xb = x[:, :, lo:hi].reshape(B, H, nb, hi - lo, D) if nb == 1 else \
            x[:, :, lo:hi].reshape(B, H, nb, block, D)
        mx, mn = torch.amax(xb, dim=3).float(), torch.amin(xb, dim=3).float()  # (B, H, nb, D)
        if shift is not None:
            mx, mn = mx - shift, mn - shift
        parts.append(torch.maximum(mx.amax(-1), -mn.amin(-1)))
    return torch.cat(parts, dim=2)


def _quantize_blocks(x: Tensor, block: int, shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """x float (B, H, N, D), shift float32 (B, H, 1, D) or None -> (int8 of
    round((x - shift) / scale) (B, H, N, D) contiguous, scale float32 (B, H, ceil(N / block))).
    Math in float32; bf16/fp16 x is widened chunk by chunk, never as a whole."""
    B, H, N, D = x.shape
    scale = _block_absmax(x, block, shift) / float(QUANT_QMAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero block -> exact zeros
    inv_tok = (1.0 / scale).repeat_interleave(block, dim=2)[:, :, :N].reshape(B * H, N, 1)
    out = torch.empty(B * H, N, D, dtype=torch.int8, device=x.device)
    if out.numel() == 0:
        return out.view(B, H, N, D), scale.contiguous()
    xf = x.reshape(B * H, N, D)
    sf = None if shift is None else shift.reshape(B * H, 1, D)
    heads = max(1, _CHUNK // max(1, N * D))       # heads per chunk when a head is small
    toks = N if heads > 1 else max(1, _CHUNK // D)  # tokens per chunk otherwise
    buf = torch.empty(min(heads, B * H), min(toks, N), D, dtype=torch.float32, device=x.device)
    for h0 in range(0, B * H, heads):
        h1 = min(h0 + heads, B * H)
        for t0 in range(0, N, toks):
            t1 = min(t0 + toks, N)
            y = buf[: h1 - h0, : t1 - t0]
            xc = xf[h0:h1, t0:t1]
            if sf is not None:
                xc = torch.sub(xc, sf[h0:h1], out=y)
            torch.mul(xc, inv_tok[h0:h1, t0:t1], out=y)  # (addcmul is far slower here)
            y.add_(_MAGIC)
            out[h0:h1, t0:t1].copy_(y.view(torch.int32))
    return out.view(B, H, N, D), scale.contiguous()


def smoothing_mean(k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """The K smoothing mean (B, Hk, 1, D) float32 over the real keys. The CPU kernel's fused
    quantization takes this exact tensor, so both quantize to the same bits. CPU tensors go to
    the native module's key_mean (256-key chunks summed in order; torch's mean over dim 2 was
    ~20x slower on a long bf16 K), when it is built."""
    native = _native_key_mean(k, key_padding_mask)
    if native is not None:
        return native
    if key_padding_mask is None:
        return k.mean(dim=2, keepdim=True, dtype=torch.float32)
    real = key_padding_mask[:, None, None, :].float()             # (B, 1, 1, Nk)
    count = real.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.matmul(real, k.float()) / count                  # (B, Hk, 1, D)


def _native_key_mean(k: Tensor, key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    if (k.device.type != "cpu" or k.dim() != 4 or k.shape[2] == 0 or k.requires_grad
            or k.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        return None
    from .backends._native_cpu import DTYPE_CODES, _module_error, load_module, num_threads

    if _module_error() is not None:
        return None
    mod = load_module()
    if not hasattr(mod, "key_mean"):
        return None
    if k.stride(-1) != 1:
        k = k.contiguous()
    B, H, N, D = k.shape
    real = None
    if key_padding_mask is not None:
        real = key_padding_mask.to(device="cpu", dtype=torch.bool).contiguous()
    out = torch.empty((B, H, 1, D), dtype=torch.float32)
    mod.key_mean(k.data_ptr(), getattr(mod.DType, DTYPE_CODES[k.dtype]), B, H, N, D,
                 k.stride(0), k.stride(1), k.stride(2), 0 if real is None else real.data_ptr(),
                 out.data_ptr(), num_threads())
    return out


def quantize_qk(
    q: Tensor,
    k: Tensor,
    *,
    q_block: int = QUANT_BLOCK,
    k_block: int = QUANT_BLOCK,
    smooth_k: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    return_k_mean: bool = False,
):
    """Per-block symmetric int8 quantization of q (B, Hq, Nq, D) and k (B, Hk, Nk, D).

    Returns ``(q8, q_scale, k8, k_scale)``: int8 contiguous tensors of the input shapes and
    float32 scales of shape (B, H, ceil(N / block)) with x ~= x8 * scale (scale = absmax / 127;
    all-zero blocks get scale 1). With ``smooth_k`` the mean of k over the real tokens (per batch
    and head) is subtracted first; padded keys are zeroed so they cannot inflate a block's scale.
    With ``return_k_mean`` the mean (B, Hk, 1, D) float32 (zeros without smoothing) is appended.
    The inputs are never modified.
    """
    _check_inputs(q, k, key_padding_mask)
    _check_block("q_block", q_block)
    _check_block("k_block", k_block)
    # k (and q) stay in their dtype: chunks are widened to float32 inside _quantize_blocks.
    # Nothing below writes into the inputs.
    kx = k
    mean = smoothing_mean(k, key_padding_mask) if smooth_k else None
    if key_padding_mask is not None:
        # Padded keys are never seen: zero them (after smoothing) so they cannot inflate a scale.
        fill = torch.zeros((), dtype=torch.float32) if mean is None else mean
        kx = torch.where(key_padding_mask[:, None, :, None], k.float(), fill)
    q8, q_scale = _quantize_blocks(q, q_block)
    k8, k_scale = _quantize_blocks(kx, k_block, mean)
    if return_k_mean:
        if mean is None:
            mean = torch.zeros(k.shape[0], k.shape[1], 1, k.shape[3], device=k.device)
        return q8, q_scale, k8, k_scale, mean
    return q8, q_scale, k8, k_scale


def dequantize(x8: Tensor, scale: Tensor, block: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """x8 (B, H, N, D) int8 with per-block scales (B, H, nb) -> (B, H, N, D) in ``dtype``."""
    s = scale.repeat_interleave(block, dim=2)[:, :, : x8.shape[2], None]
    return x8.to(dtype) * s.to(dtype)


def int8_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_left: int = -1,
    window_right: int = -1,
    causal: bool = False,
    landmarks: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    q_block: int = QUANT_BLOCK,
    k_block: int = QUANT_BLOCK,
    smooth_k: bool = True,
    pv_dtype: torch.dtype = torch.bfloat16,
    softcap: float = 0.0,
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """What the int8 kernels compute (``softcap``/``bias`` are accepted so a Pattern's
    ``reference_kwargs()`` can be passed, but must be unset: the CPU int8 kernels this emulates
    take no score modifiers): quantize with :func:`quantize_qk`, integer q8.k8 (exact in
    float64), times q_scale * k_scale * scale, masked softmax in float64, then PV:

    * ``pv_dtype=torch.bfloat16`` (the kernels' precision): p = 2^(s log2(e) - M) with M the row
      max rounded up to an integer, and v, are rounded to fp32 and then to bf16 (nearest even),
      multiplied and summed in float64, and divided by the row sum of the *unrounded* p (the
      kernels' softmax sum uses fp32 p before rounding). The AVX-512/AMX kernels shift by an
      integer max too (bf16 rounding commutes with the power-of-2 difference); the AVX2/portable
      ones by their running max, and all use an fp32 exp2, so this is an emulation, not a
      bit-exact copy.
    * ``pv_dtype=torch.float16``: the same with fp16 rounding (Triton's PV with fp16 V; fp16
      has subnormals, so tiny p differ from a power-of-2-shifted kernel's p a little more).
    * ``pv_dtype=torch.float64``: exact PV, the oracle.

    Returns (out float32 (B, Hq, Nq, Dv), lse float32 (B, Hq, Nq)); lse is that of the smoothed
    scores (see the module note). Dense: O(Nq * Nk) memory, for tests.
    """
    if pv_dtype not in (torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"pv_dtype must be torch.bfloat16, torch.float16 or torch.float64; "
                         f"got {pv_dtype}")
    if softcap > 0 or bias is not None:
        raise ValueError("int8_reference emulates the CPU int8 kernels, which take no score "
                         "modifiers; got softcap or bias")
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must be (B, Hk, Nk, Dv) matching k {tuple(k.shape)}")
    if Hk < 1 or Hq % Hk != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hk ({Hk})")
    scale = D ** -0.5 if scale is None else float(scale)
    q8, q_scale, k8, k_scale = quantize_qk(q, k, q_block=q_block, k_block=k_block,
                                           smooth_k=smooth_k, key_padding_mask=key_padding_mask)
    g = Hq // Hk
    k8d = k8.double().repeat_interleave(g, dim=1)
    ksc = k_scale.double().repeat_interleave(g, dim=1).repeat_interleave(k_block, dim=2)[:, :, :Nk]
    qsc = q_scale.double().repeat_interleave(q_block, dim=2)[:, :, :Nq]
    dots = torch.matmul(q8.double(), k8d.transpose(-1, -2))  # exact integers
    scores = dots * qsc[..., :, None] * ksc[..., None, :] * scale
    mask = visibility_mask(B, Nq, Nk, window_left=window_left, window_right=window_right,
                           causal=causal, landmarks=landmarks, key_padding_mask=key_padding_mask,
                           device=q.device)
    p, lse = masked_softmax_lse(scores, mask)
    vd = v.double().repeat_interleave(g, dim=1)
    if pv_dtype == torch.float64:
        return torch.matmul(p, vd).float(), lse.float()
    return _pv_rounded(scores, mask, vd, pv_dtype).float(), lse.float()


def _round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x rounded to fp32, then to the nearest ``dtype`` value (ties to even), as float64."""
    return x.float().to(dtype).double()


def _pv_rounded(scores: Tensor, mask: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_j r(p_ij) r(v_j) / sum_j p_ij (r: rounding to ``dtype``, bf16 or fp16) over visible keys (float64 scores and v), rows that
    see nothing give 0, with p_ij = 2^(t_ij - ceil(max_j t_ij)), t = s * log2(e): the kernels work
    in base 2 and shift by a max rounded up to an integer, so their p differs from this one by a
    power of 2 only, which bf16 rounding commutes with."""
    t = scores.masked_fill(~mask, float("-inf")) * math.log2(math.e)
    m = torch.ceil(t.amax(dim=-1, keepdim=True))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp2(t - m)
    l = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(_round_to(e, dtype), _round_to(v, dtype))
    return out / torch.where(l > 0, l, torch.ones_like(l))


def smoothing_lse_offset(q: Tensor, k_mean: Tensor, scale: float) -> Tensor:
    """scale * q . mean(k) per query row (B, Hq, Nq): what K smoothing removed from the lse."""
    groups = q.shape[1] // k_mean.shape[1]
    mean = k_mean.repeat_interleave(groups, dim=1) if groups > 1 else k_mean
    return (q.float() @ mean.transpose(-1, -2)).squeeze(-1) * scale
