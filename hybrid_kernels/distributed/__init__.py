"""Scale-out on torch.distributed: sequence-parallel window + landmark attention.

    import torch.distributed as dist, hybrid_kernels.distributed as hkd
    dist.init_process_group("gloo")            # or nccl; torchrun sets the rendezvous
    out = hkd.attention(q_shard, k_shard, v_shard, window=(256, 256), landmarks=64)
    hkd.shutdown()                             # at the end, on every rank

See sequence_parallel.py for what each rank sends, and README ("Scale-out").
"""
from .agreement import RankDisagreement
from .comm import CommStats
from .layers import SequenceParallelSelfAttention
from .sequence_parallel import attention
from .teardown import shutdown

__all__ = ["attention", "CommStats", "RankDisagreement", "SequenceParallelSelfAttention", "shutdown"]
