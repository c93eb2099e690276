"""Test helper: gather a tensor-parallel model's full tensors into the canonical single-rank layout
(whole tensors on one rank: for comparing small test models, never for library code)."""
from typing import Dict, Optional

import torch
import torch.distributed as dist

from msg_megatron.model.params import ids_name, unit_layout
from msg_megatron.model.tp_layout import canonical_units, sharded_axis


def canonical_state_dict(model, dst: Optional[int] = 0) -> Optional[Dict[str, torch.Tensor]]:
    """Full tensors in the canonical layout on global rank `dst` (None elsewhere); every TP rank
    must call it. Without TP this is the state dict itself (its units are already canonical)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if tp == 1:
        return sd
    group = ps.get_tensor_model_parallel_group()
    head_dim, gated = model.mcfg.head_dim, model.mcfg.activation == "swiglu"
    out = {}
    for name, local in sd.items():
        found = sharded_axis(name)
        if found is None:
            out[name] = local.clone()
            continue
        axis, role = found
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        if role == "vocab":
            out[name] = torch.cat(parts, axis)
            continue
        ids = sd[ids_name(name, role)]
        id_parts = [torch.empty_like(ids) for _ in range(tp)]
        dist.all_gather(id_parts, ids, group=group)
        order = torch.argsort(torch.cat(id_parts))  # canonical unit u comes from gathered unit order[u]
        unit, blocks = unit_layout(role, head_dim, gated, model.mcfg.heads_per_group)
        # each rank's shard is [block 0 units; block 1 units]: lay them out as the checkpoint's global
        # tensor does ([block 0 of every rank; block 1 of every rank]), then sort the units
        split = [p.chunk(blocks, axis) for p in parts]
        full = torch.cat([s[b] for b in range(blocks) for s in split], axis)
        out[name] = canonical_units(full, axis, order, unit, blocks)
    return out if dst is None or dist.get_rank() == dst else None
