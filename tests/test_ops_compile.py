"""torch.library registration: opcheck, fake tensors, torch.compile without graph breaks."""
import pytest
import torch

import hybrid_kernels as hk

BACKENDS = ["cpu", "reference"]


def _args(backend, quant="", mods=False):
    q = torch.randn(2, 4, 33, 16, requires_grad=True)
    k = torch.randn(2, 2, 40, 16, requires_grad=True)
    v = torch.randn(2, 2, 40, 16, requires_grad=True)
    lm = torch.tensor([0, 9, 30]).expand(2, -1)
    kpm = torch.rand(2, 40) > 0.2
    softcap, bias, sinks = 0.0, None, None
    if mods:  # softcap, an offset bias table and sinks, all differentiable where they can be
        softcap = 2.0
        bias = torch.randn(4, 33 + 40 - 1, requires_grad=True)
        sinks = torch.randn(4, requires_grad=True)
    return (q, k, v, lm, kpm, 4, 2, True, 0.25, softcap, bias, sinks, quant, backend)


def _takes_mods(backend, quant):
    from hybrid_kernels.dispatch import get_backend
    b = get_backend(backend)
    return {"softcap", "bias"} <= (b.int8_score_mods if quant else b.score_mods)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", ["", "int8"])
@pytest.mark.parametrize("mods", [False, True])
def test_opcheck(backend, quant, mods):
    if mods and not _takes_mods(backend, quant):
        backend = "reference"  # what dispatch picks for such a call (test_score_mods checks it)
    torch.library.opcheck(torch.ops.hybrid_kernels.attention_fwd.default, _args(backend, quant, mods),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()

    def layer(q, k, v, bias, sinks):
        return hk.attention(q, k, v, window=(4, 4), landmarks=8, causal=True, softcap=3.0,
                            position_bias=bias, sinks=sinks, backend=backend).sum()

    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    bias, sinks = torch.randn(2, 79, requires_grad=True), torch.randn(2, requires_grad=True)
    if not _takes_mods(backend, ""):
        backend = "reference"
    eager = torch.autograd.grad(layer(q, k, v, bias, sinks), (q, k, v, bias, sinks))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, bias, sinks), (q, k, v, bias, sinks))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_compile_has_no_graph_breaks_in_a_model():
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
            return hk.attention(q, k, v, window=(8, 8), landmarks=16).transpose(1, 2).reshape(B, N, 32)

    explanation = torch._dynamo.explain(Block())(torch.randn(2, 64, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
