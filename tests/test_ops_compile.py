"""torch.library registration: opcheck, fake tensors, torch.compile without graph breaks."""
import pytest
import torch

import hybrid_kernels as hk

BACKENDS = ["cpu", "reference"]


def _args(backend, quant=""):
    q = torch.randn(2, 4, 33, 16, requires_grad=True)
    k = torch.randn(2, 2, 40, 16, requires_grad=True)
    v = torch.randn(2, 2, 40, 16, requires_grad=True)
    lm = torch.tensor([0, 9, 30]).expand(2, -1)
    kpm = torch.rand(2, 40) > 0.2
    return (q, k, v, lm, kpm, 4, 2, True, 0.25, quant, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", ["", "int8"])
def test_opcheck(backend, quant):
    torch.library.opcheck(torch.ops.hybrid_kernels.attention_fwd.default, _args(backend, quant),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()

    def layer(q, k, v):
        return hk.attention(q, k, v, window=(4, 4), landmarks=8, causal=True, backend=backend).sum()

    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    eager = torch.autograd.grad(layer(q, k, v), (q, k, v))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
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
