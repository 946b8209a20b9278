"""The score modifiers inside the kernels (pattern.py): softcap, then the offset bias table.

Scores are in base 2 (scale * log2(e) * q.k), so the softcap and the bias table arrive multiplied
by log2(e) (pattern_args.py): softcap2 * tanh(s / softcap2) is log2(e) times the natural-unit cap.
Every kernel that computes scores calls :func:`modify_scores`.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh in fp32 to a few ulp with exp2 only (libdevice is not there under the interpreter):
    odd Taylor polynomial for |x| < 0.5 (no cancellation near 0), (1 - e) / (1 + e) with
    e = exp(-2|x|) elsewhere."""
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # -2 * log2(e)
    far = (1.0 - e) / (1.0 + e)
    x2 = a * a
    near = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * (
            -0.008863235529902197 + x2 * (0.003592128036572481 + x2 * -0.0014558343870513183)))))))
    t = tl.where(a < 0.5, near, far)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def modify_scores(s, r, j, bias_h, nk, n_off, softcap2, SOFTCAP: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """Base-2 scores s (rows r aligned, keys j) -> (modified s, dcap): softcap2 * tanh(s / softcap2)
    under SOFTCAP, then + bias_h[(j - r) + Nk - 1] (bias_h: this head's row of the table, n_off
    entries). dcap = d(capped)/d(s) = 1 - tanh^2 under SOFTCAP (the backward's factor), else 1."""
    dcap = 1.0
    if SOFTCAP:
        t = tanh(s / softcap2)
        s = softcap2 * t
        dcap = 1.0 - t * t
    if HAS_BIAS:
        idx = j[None, :] - r[:, None] + (nk - 1)
        s = s + tl.load(bias_h + idx, mask=(idx >= 0) & (idx < n_off), other=0.0)
    return s, dcap


@triton.jit
def add_bias_grad(dbias_h, ds, r, j, nk, n_off, mask):
    """dbias_h[(j - r) + Nk - 1] += ds on the pairs of ``mask``. Atomic adds: the sum's order
    varies from run to run, so dbias is not bit-deterministic (dq, dk, dv still are)."""
    idx = j[None, :] - r[:, None] + (nk - 1)
    tl.atomic_add(dbias_h + idx, ds, mask=mask & (idx >= 0) & (idx < n_off), sem="relaxed")
