"""Forcing the CPU kernels' instruction set in tests (HYBRID_KERNELS_CPU_ISA)."""
import pytest

from hybrid_kernels.backends.cpu import load_module


def supported(isa: str) -> bool:
    """Whether this CPU can run the ``isa`` kernels ("amx", "avx512", "avx2", "scalar")."""
    f = load_module().cpu_features()
    return {
        "amx": f["amx_tile"] and f["amx_bf16"] and f["amx_int8"] and f["avx512bf16"],
        "avx512": f["avx512f"] and f["avx512bw"] and f["avx512vl"] and f["avx512bf16"] and f["avx512vnni"],
        "avx2": f["avx2"] and f["fma"] and f["f16c"],
        "scalar": True,
    }[isa]


def force(monkeypatch, isa: str) -> None:
    """Run the CPU kernels with ``isa`` for the rest of the test; skip where the CPU cannot."""
    if not supported(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", isa)
    assert load_module().selected_isa() == isa
