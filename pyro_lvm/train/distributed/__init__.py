"""Data-parallel training on ``torch.distributed`` (started by ``torchrun``): the gradient
all-reduce, what the loop asks of the process group, and per-datapoint parameters sharded over
processes. The process group itself is :mod:`pyro_lvm.process_group`."""

from pyro_lvm.process_group import DistributedError, init_distributed, rank_and_size
from pyro_lvm.train.distributed.data_parallel import DataParallel, barrier
from pyro_lvm.train.distributed.sharded import ShardedCheckpointer, ShardedLocalGuide, shard_size
from pyro_lvm.train.distributed.sync import GradientSync

__all__ = [
    "DataParallel",
    "DistributedError",
    "GradientSync",
    "ShardedCheckpointer",
    "ShardedLocalGuide",
    "barrier",
    "init_distributed",
    "rank_and_size",
    "shard_size",
]
