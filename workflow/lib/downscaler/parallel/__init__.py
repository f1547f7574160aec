"""Hybrid parallelism applied to a plain model from outside (torchtitan style).

One ``Layout`` (data replicas x FSDP shards x Ulysses sequence x Megatron tensor sizes) becomes
one DeviceMesh (``build_mesh``); ``parallelize`` applies D-CHAG, tensor parallel, sequence
parallel, activation checkpointing and FSDP2 / HSDP / DDP to a ``Reslim`` in that order;
``engine`` trains it (or DeepSpeed does), ``clip`` clips its gradients, ``train_state`` saves it.
``spawn`` (the one launcher's, ``downscaler.launcher.spawn``) starts local gloo processes.
"""

from ..launcher import spawn
from .layout import Layout, LayoutError, build_mesh
from .parallelize import parallelize, reduce_gradients, shard_batch

__all__ = [
    "Layout",
    "LayoutError",
    "build_mesh",
    "parallelize",
    "reduce_gradients",
    "shard_batch",
    "spawn",
]
