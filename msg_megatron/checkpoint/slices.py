"""A data-parallel rank's slice of a parameter as pieces of the parameter's global checkpoint tensor.

megatron's distributed optimizer gives each DP rank one contiguous range [start, end) of every
parameter's flattened local (TP-shard) tensor: its fp32 master and AdamW moments exist only for
that range. megatron-core 0.16.1 has no working way to write such ranges in model space (its
`fully_sharded_model_space` format builds `flattened_range` ShardedTensors, which 0.16.1's
`ShardedTensor.validate_metadata_integrity` rejects; `fully_reshardable` gathers whole buffers).
So the range is cut here into at most 2 * ndim - 1 boxes (a partial first row, whole rows, a
partial last row, recursively), each an ordinary rectangular ShardedTensor of the same global
tensor, with no regular grid (megatron defers such shardings to torch DCP, which checks coverage
and overlaps). Every rank writes and reads only its own range, without a collective or a copy:
the boxes share the slice's memory, each with a storage of its own size (so megatron's writer,
which copies CPU views before writing, writes them as they are). The global tensors are the same as those written by whole-shard
checkpoints, so either kind loads into the other under any TP/PP/DP layout.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch


def boxes(shape: Tuple[int, ...], start: int, end: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """(offset, shape) boxes that tile the flattened elements [start, end) of a C-contiguous tensor
    of `shape`, in element order; each box is itself a contiguous run of those elements."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))]
    inner = math.prod(shape[1:])
    out = []
    row, rem = divmod(start, inner)
    if rem:  # a partial first row
        stop = min(end, (row + 1) * inner)
        out += [((row,) + o, (1,) + s) for o, s in boxes(shape[1:], rem, stop - row * inner)]
        start, row = stop, row + 1
    full = (end - start) // inner if start < end else 0
    if full:  # whole rows
        out.append(((row,) + (0,) * (len(shape) - 1), (full,) + tuple(shape[1:])))
        start, row = start + full * inner, row + full
    if start < end:  # a partial last row
        out += [((row,) + o, (1,) + s) for o, s in boxes(shape[1:], 0, end - row * inner)]
    return out


def components(model_sh) -> List[Tuple[object, int]]:
    """The parameter's plain ShardedTensors (a factory, e.g. SwiGLU's [gate; up], is built into its
    parts) with the flat offset of each part within the parameter's local tensor."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if not isinstance(model_sh, ShardedTensorFactory):
        return [(model_sh, 0)]
    base = model_sh.data
    parts = model_sh.build_fn(model_sh.key, base, model_sh.replica_id, None)
    out = []
    for sh in nested_values(parts):
        if not sh.data.is_contiguous():
            raise ValueError(f"cannot slice `{model_sh.key}`: a part of its factory is not a contiguous view")
        offset = (sh.data.data_ptr() - base.data_ptr()) // base.element_size()
        out.append((sh, offset))
    return out


def _exact(t: torch.Tensor) -> torch.Tensor:
    """`t` (a contiguous view) as a tensor whose storage is exactly its own elements, sharing their
    memory. megatron's writer copies a CPU tensor whose storage is larger than the tensor before
    writing it (torch.save would write the whole storage); a box of a slice, or a slice of the
    parameter buffer, would be copied whole that way. With an exact storage nothing is copied.
    (A meta tensor, msg-plan --dry-run's, is returned as it is: it is never written.)"""
    if t.device.type == "meta":
        return t
    nbytes = t.element_size()
    storage = t.untyped_storage()[t.storage_offset() * nbytes:(t.storage_offset() + t.numel()) * nbytes]
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, t.shape)


def slice_pieces(model_sh, key: str, flat: torch.Tensor, start: int, end: int, replica_id) -> list:
    """ShardedTensors under `key` for the elements [start, end) of the parameter described by
    `model_sh` (its model ShardedTensor or factory), backed by `flat` (those elements, 1-D)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if flat.numel() != end - start:
        raise ValueError(f"`{key}`: the slice holds {flat.numel()} elements, not {end - start}")
    out = []
    for sh, offset in components(model_sh):
        lo, hi = max(start, offset), min(end, offset + math.prod(sh.local_shape))
        pos = lo - start
        pre = sh.prepend_axis_num
        for off, shape in boxes(tuple(sh.local_shape), lo - offset, hi - offset):
            n = math.prod(shape)
            out.append(ShardedTensor(
                key, _exact(flat[pos:pos + n].view(shape)), flat.dtype, tuple(shape), tuple(sh.global_shape),
                tuple(sh.global_offset[:pre]) + tuple(g + o for g, o in zip(sh.global_offset[pre:], off)),
                None, replica_id, pre))
            pos += n
    return out
