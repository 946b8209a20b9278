"""Integrations with other libraries, imported on first use (``hk.integrations.transformers``)."""
import importlib

_SUBMODULES = {"transformers", "hf_config", "hf_compat"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hybrid_kernels.integrations' has no attribute {name!r}")
