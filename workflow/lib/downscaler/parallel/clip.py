"""Global gradient norm and clipping for every layout (torchtitan's ``clip_grad_norm_`` shape).

Under the hybrid layouts the gradients are of several kinds at once: DTensors on the tp mesh
(tensor-parallel blocks), on the dp mesh (FSDP2 shards), on the 2-D (dp, tp) mesh (FSDP + TP),
plain tensors that every rank holds identically (replicated parameters, ``pos_scale`` under FSDP2,
everything under DDP), and D-CHAG's private per-rank weights: plain or FSDP-sharded tensors that
hold *different* values on each tp rank. ``torch.nn.utils.clip_grad_norm_`` cannot mix them
("mixed torch.Tensor and DTensor") and would count a private weight once per rank.

Here the gradients are split into buckets (DTensors by mesh and placements; plain shared; and,
for each of these, the tp-distinct ones apart), each bucket's norm is taken with one foreach
kernel, a DTensor bucket's norm becomes the global one with ``full_tensor()``, a tp-distinct
bucket's squared norm is summed over the tp group, and the buckets combine as
``sqrt(sum norm_b^2)``. Every rank then holds the norm of the single-process model's gradient and
scales every bucket by the same factor. The total stays on the device (no host sync).
Call it after ``parallelize.reduce_gradients``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["clip_grad_norm_", "grad_norm_buckets"]


def grad_norm_buckets(
    model: nn.Module, is_distinct: Callable[[str], bool] | None = None
) -> dict[tuple, list[Tensor]]:
    """Gradients grouped by how their norm is made global: ``(mesh, placements, distinct)``.

    ``mesh`` and ``placements`` are None for plain tensors; ``distinct`` marks parameters whose
    value differs on each tp rank (``is_distinct(name)``, names of the unwrapped model).
    """
    inner = getattr(model, "module", model)  # DDP's prefix would hide the names
    buckets: dict[tuple, list[Tensor]] = {}
    for name, p in inner.named_parameters():
        if p.grad is None:
            continue
        distinct = bool(is_distinct and is_distinct(name))
        g = p.grad
        key = ((g.device_mesh, tuple(g.placements), distinct) if isinstance(g, DTensor)
               else (None, None, distinct))
        buckets.setdefault(key, []).append(g)
    return buckets


@torch.no_grad()
def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    tp_group: dist.ProcessGroup | None = None,
    is_distinct: Callable[[str], bool] | None = None,
    pp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Clip the gradients of ``model`` in place to global 2-norm ``max_norm``; return the norm.

    The norm is that of the whole (single-process) model's gradient, computed in the gradients'
    own dtype (float64 gradients give a float64 norm). ``tp_group`` and ``is_distinct`` name the
    D-CHAG private parameters and the group over which they differ (None: every plain gradient is
    replicated). ``pp_group``: the pipeline stages, each holding other parameters (their
    squared norms add up, as in torchtitan). ``max_norm`` <= 0 or inf measures without clipping.
    """
    buckets = grad_norm_buckets(model, is_distinct)
    device = next((g.device for grads in buckets.values() for g in grads), torch.device("cpu"))
    dtype = next((g.dtype for grads in buckets.values() for g in grads), torch.float32)
    total_sq = torch.zeros((), dtype=dtype, device=device)
    for (_, _, distinct), grads in buckets.items():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(norm, DTensor):  # partial over the mesh: the global norm of the bucket
            norm = norm.full_tensor()
        sq = norm.to(dtype) ** 2
        if distinct and tp_group is not None:
            dist.all_reduce(sq, group=tp_group)
        total_sq = total_sq + sq
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0 and max_norm != float("inf"):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in buckets.values():
            local = [g._local_tensor if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total
