"""Tile configurations for the Triton kernels.

On a GPU each kernel is autotuned over a small set keyed on the head dims, the dtypes (added by
``triton.autotune`` itself) and the pattern kind (causal, landmarks, which pass). Under
``TRITON_INTERPRET=1`` there is a single small config so the interpreter stays fast. With
``HK_TRITON_AUTOTUNE=0`` (the GPU correctness tests) each key gets one config picked by the element
size and head dim, so a test compiles one kernel instead of six.
"""
from __future__ import annotations

import os

import triton

# Autotune keys shared by the attention kernels (constexpr arguments of every kernel).
PATTERN_KEYS = ["BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_LM", "HAS_PAD", "LM_MODE", "SOFTCAP",
                "HAS_BIAS"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def autotune_enabled() -> bool:
    return os.environ.get("HK_TRITON_AUTOTUNE", "1") != "0"


def prune_when_not_tuning(configs, named_args, **kwargs):
    """early_config_prune: every config, or with autotuning off the first (the largest tile) for
    8/16-bit inputs with head dims up to 128 and the last (the smallest, which fits shared memory)
    otherwise."""
    if autotune_enabled() or len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    wide = (args["Q"].element_size() >= 4
            or max(args.get("BLOCK_D", 0), args.get("BLOCK_DV", 0)) > 128)
    return [configs[-1] if wide else configs[0]]


PRUNE = {"early_config_prune": prune_when_not_tuning}


def forward_configs():
    if interpreting():
        return [_cfg(32, 32, 1, 1)]
    return [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3),
            _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2),
            _cfg(32, 32, 4, 1)]  # fits shared memory for fp32 / D = 256


def backward_configs():
    if interpreting():
        return [_cfg(32, 32, 1, 1)]
    return [_cfg(64, 64, 4, 2), _cfg(64, 64, 8, 2), _cfg(32, 64, 4, 2),
            _cfg(64, 32, 4, 2), _cfg(128, 64, 8, 2),
            _cfg(32, 32, 4, 1)]  # fits shared memory for fp32 / D = 256


def quantize_block_sizes():
    """Rows per INT8 scale block for Q and for K (independent of the attention tiles): the one
    INT8 definition's QUANT_BLOCK (hybrid_kernels/quant.py), on a GPU and under the interpreter."""
    from ..quant import QUANT_BLOCK
    return QUANT_BLOCK, QUANT_BLOCK


SUPPORTED_MAX_HEAD_DIM = 256


def padded_head_dim(d: int) -> int:
    """Head dims are padded (masked) up to a power of two >= 32 for tl.dot (the int8 MMA needs
    K >= 32)."""
    return max(32, triton.next_power_of_2(d))


def dot_precision(dtype) -> int:
    """The IEEE constexpr of masking.dot for inputs of ``dtype``."""
    import torch
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and interpreting():
        return 2
    return 0


def landmark_key_splits(nk: int, parallel_heads: int):
    """(keys per split, number of splits) for the landmark-row pass. A split is a multiple of
    every BLOCK_N; splits are added until there are about two programs per SM."""
    if interpreting():
        split = 64
    else:
        target_splits = max(1, -(-264 // max(parallel_heads, 1)))
        split = max(1024, -(-nk // target_splits))
        split = -(-split // 128) * 128
    return split, -(-nk // split)
