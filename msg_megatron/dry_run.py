"""msg-plan --dry-run: every stage of a growth schedule built for real on a laptop, no GPU.

For each stage of the schedule, at its layout (TP x PP x DP = parallel.gpus ranks), torch.distributed
is initialised on torch's fake process group at the real world size, once per simulated rank, with
megatron's parallel state for that rank. The rank's model (the real classes), its optimizer (megatron's
DDP buffers, the distributed optimizer's slices) and its checkpoint state dict (`checkpoint/dist._sharded`,
what a save writes) are built on the `meta` device: shapes and dtypes without memory
(patches.meta_world puts megatron's device buffers there too). From them:

- **checkpoint coverage**: over every rank of the stage, the pieces each key is written as (the main
  replicas) tile its global tensor exactly once: same global shape everywhere, inside the bounds, no
  overlap, and their volumes sum to the tensor's. (Every rank is built for this: a rank costs ~0.1 s.)
- **memory from real tensors**, per selected rank: bytes of the parameters (megatron's contiguous buffer
  where there is one), the gradient buffers and the optimizer's fp32 masters and AdamW moments (the
  moments as AdamW's first step allocates them: one fp32 tensor like each master, twice), printed beside
  msg-plan's formula (training/sizes.stage_memory) with the difference named: the buckets' padding.
- **growth and re-layout**: into every stage after the first, each rank's new layers get their
  sources the way the real growth will pick them (online: grow_model's per-stage/per-chunk plan;
  at a new layout: msg-grow's `stage_groups`), every new layer exactly once over the ranks, and every
  checkpoint key of the new stage has its source key in the old stage's checkpoint with the same
  rank and no dimension smaller (growth only adds; checkpoints hold global tensors, so msg-grow's
  reshard onto the new layout reads each new shard from them).
- **micro-batches**: per DP rank, and under the interleaved pipeline in groups of PP.

A failure names the stage, the rank and the reason, and the command exits non-zero.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from typing import Dict, List, Optional

import torch

from .checkpoint.dist import _sharded
from .config import ConfigError
from .growth.operators import chunk_depth_plan
from .growth.stream import stage_groups
from .model.gpt import MaskedGPT, padded_vocab_size, stage_piece, virtual_size
from .optim.optimizer import MOMENTS, build_optimizer, cast_params, param_dtype
from .parallel import destroy_parallel, initialize_parallel
from .patches import apply_cpu_patches, meta_world
from .training.run_setup import check_batch_split
from .training.sizes import activation_settings, stage_memory


class DryRunError(RuntimeError):
    """A stage that would fail on the cluster: the message names the stage, the rank and why."""


def rank_coordinates(rank: int, tp: int, pp: int, dp: int) -> tuple:
    """(tp rank, dp rank, pp rank) of a global rank in megatron's default order (tp-cp-ep-dp-pp:
    TP fastest, PP slowest); checked against megatron's own parallel state when each rank is built."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def select_ranks(spec: str, tp: int, pp: int, dp: int) -> List[int]:
    """`edges`: the first and last rank of every coordinate (TP, PP and DP); `all`; or `R1,R2,...`."""
    world = tp * pp * dp
    if spec == "all":
        return list(range(world))
    if spec == "edges":
        ends = lambda n: sorted({0, n - 1})  # noqa: E731
        return sorted(t + tp * (d + dp * p) for t in ends(tp) for d in ends(dp) for p in ends(pp))
    try:
        ranks = sorted({int(r) for r in spec.split(",")})
    except ValueError:
        raise ValueError(f"--ranks {spec!r}: use edges, all or a comma-separated list of ranks") from None
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise ValueError(f"--ranks {spec}: rank(s) {bad} are outside the world of {world} ranks")
    return ranks


@contextlib.contextmanager
def fake_rank(world: int, rank: int, tp: int, pp: int, seed: int, sequence_parallel: bool, virtual_pipeline: int):
    """This process as global rank `rank` of `world` on torch's fake process group, megatron's
    parallel state set up for it, new tensors on `meta`."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore


    if dist.is_initialized():
        raise RuntimeError("the dry run needs a process without torch.distributed (msg-plan runs it in its own)")
    apply_cpu_patches()  # (first: meta_world then replaces its current_device for the block)
    with meta_world():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            initialize_parallel(tp, pp, seed, sequence_parallel, virtual_pipeline)
            with torch.device("meta"):
                yield
        finally:
            destroy_parallel()


def build_rank(cfg, shape):
    """This rank's model, optimizer (with its AdamW moments allocated) and checkpoint pieces."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica


    model = cast_params(MaskedGPT(cfg.model, shape, perform_init=False), param_dtype(cfg.train))
    opt = build_optimizer(model, cfg.train, cfg.parallel)
    for p in model.parameters():  # the moments AdamW's first step allocates
        rng = opt.local_range(p)
        if rng is not None:
            n = rng[1] - rng[0]
            opt.set_local_state(p, {"step": 0,
                                    **{k: torch.zeros(n, dtype=torch.float32) for k in MOMENTS}})
    sd, _ = _sharded(model, opt)
    apply_factories(sd)
    pieces = [(sh.key, tuple(sh.global_shape), tuple(sh.global_offset), tuple(sh.local_shape), str(sh.dtype))
              for sh in nested_values(sd) if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id)]
    return model, opt, pieces


def memory_of(model, opt) -> Dict[str, int]:
    """Bytes this rank holds for training, from the tensors built (no activations)."""
    ddp = opt.ddp
    param_buffers = [b.param_data for b in ddp.buffers if b.param_data is not None]
    weights = (sum(b.numel() * b.element_size() for b in param_buffers) if param_buffers
               else sum(p.numel() * p.element_size() for p in model.parameters()))
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    held = [q for g in opt.adamw.param_groups for q in g["params"]]
    masters = sum(q.numel() * 4 for q in held) if opt.bf16 else 0  # fp32 copies of bf16 weights (or their slices)
    moments = sum(t.numel() * t.element_size() for st in opt.adamw.state.values() for k, t in st.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    params = sum(p.numel() for p in model.parameters())
    padding = sum(b.grad_data.numel() for b in ddp.buffers) - params
    # whole on every TP rank (norms, row-parallel biases, learned positions): the formula divides them by TP
    replicated = sum(p.numel() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False))
    return {"params": params, "weights": weights, "grads": grads, "optimizer": masters + moments,
            "total": weights + grads + masters + moments, "bucket_padding_elements": padding,
            "replicated_params": replicated}


def depth_sources(old, new, depth_init: str, online: bool) -> Dict[int, Optional[int]]:
    """{new global layer: old global layer it grows from (None: a random new layer)} on this rank,
    as the real growth computes it: online, grow_model's plan over this stage's (chunks') layers;
    at a new layout, msg-grow's groups."""
    if online:
        o, n, v = stage_piece(old), stage_piece(new), virtual_size()
        plan = chunk_depth_plan(len(o.layers), len(n.layers), v, depth_init)
        return {n.layers[j]: (None if src is None else o.layers[src]) for j, src in enumerate(plan)}
    out = {}
    for g in stage_groups(old, new, depth_init)[1:]:
        for layer in g.new.layers:
            out[layer] = g.old.layers[0] if g.old.layers else None
    return out


_LAYER_KEY = re.compile(r"(model\.layers\.)(\d+)(\.)")


def check_growth_mapping(old_keys: Dict[str, tuple], new_keys: Dict[str, tuple], sources: Dict[int, list],
                         new_layers: int, stage: int) -> dict:
    """Every new layer has one source over the ranks, and every new key its source key (same rank,
    no smaller dimension). Returns counts of grown, copied and new tensors."""
    for layer in range(new_layers):
        got = sources.get(layer, [])
        if len(got) != 1:
            raise DryRunError(f"growth into stage {stage}: new layer {layer} is built by {len(got)} ranks' plans "
                              f"({'none' if not got else 'several'}); the layer split of the two layouts disagrees")
    grown = copied = fresh = 0
    seen_sources = set()
    for key, (gshape, _) in sorted(new_keys.items()):
        src_key = key
        found = _LAYER_KEY.search(key)
        if found:
            src = sources[int(found.group(2))][0]
            if src is None:
                fresh += 1
                continue
            src_key = key[:found.start(2)] + str(src) + key[found.end(2):]
        if src_key not in old_keys:
            raise DryRunError(f"growth into stage {stage}: `{key}` grows from `{src_key}`, which the previous stage's "
                              "checkpoint does not have")
        old_shape = old_keys[src_key][0]
        if len(old_shape) != len(gshape) or any(a > b for a, b in zip(old_shape, gshape)):
            raise DryRunError(f"growth into stage {stage}: `{key}` {gshape} cannot grow from `{src_key}` {old_shape} "
                              "(growth only adds units)")
        copied += src_key in seen_sources
        grown += src_key not in seen_sources
        seen_sources.add(src_key)
    return {"grown": grown, "copies": copied, "new": fresh}


def check_coverage(pieces: list, stage: int) -> int:
    """Every key's main pieces tile its global tensor exactly once; returns the number of keys."""
    by_key: Dict[str, list] = {}
    for key, gshape, off, lshape, dtype, rank in pieces:
        by_key.setdefault(key, []).append((gshape, off, lshape, dtype, rank))
    for key, items in by_key.items():
        shapes = {(g, d) for g, _, _, d, _ in items}
        if len(shapes) != 1:
            raise DryRunError(f"stage {stage}: checkpoint key `{key}` has inconsistent global shapes/dtypes {sorted(shapes)}")
        (gshape, _), = shapes
        for g, off, ls, _, rank in items:
            if any(o < 0 or o + n > s for o, n, s in zip(off, ls, g)):
                raise DryRunError(f"stage {stage}, rank {rank}: `{key}` piece at {off} of {ls} lies outside its "
                                  f"global shape {g}")
        _no_overlap(key, items, stage)
        covered = sum(math.prod(ls) for _, _, ls, _, _ in items)
        if covered != math.prod(gshape):
            raise DryRunError(f"stage {stage}: checkpoint key `{key}` (global {gshape}) is covered by {covered} of "
                              f"{math.prod(gshape)} elements: a gap in what the ranks write")
    return len(by_key)


def _no_overlap(key: str, items: list, stage: int) -> None:
    """Sweep along axis 0: only pieces whose first-axis ranges meet are compared."""
    boxes = sorted(((off, ls, rank) for _, off, ls, _, rank in items), key=lambda b: b[0][:1] or (0,))
    active: list = []
    for off, ls, rank in boxes:
        start = off[0] if off else 0
        active = [b for b in active if (b[0][0] + b[1][0] if b[0] else 1) > start]
        for o2, l2, r2 in active:
            if all(a < c + m and c < a + n for a, n, c, m in zip(off, ls, o2, l2)):
                raise DryRunError(f"stage {stage}: checkpoint key `{key}` is written twice: rank {r2}'s piece at "
                                  f"{o2} of {l2} overlaps rank {rank}'s at {off} of {ls}")
        active.append((off, ls, rank))


def dry_run(cfg, ranks: str = "edges", gpu_memory_gib: Optional[float] = None, log=print) -> dict:
    """Build every stage of `cfg`'s schedule rank by rank (see the module docstring)."""

    t0 = time.perf_counter()
    sched = cfg.schedule()
    vocab = padded_vocab_size(cfg.model)
    out = {"stages": [], "ranks": ranks}
    prev_keys = None
    for i, (_, shape) in enumerate(sched):
        tp, pp = cfg.layout(i)
        world = cfg.parallel.gpus or tp * pp
        if world % (tp * pp):
            raise DryRunError(f"stage {i}: parallel.gpus={world} is not a multiple of tensor x pipeline = {tp * pp}")
        dp = world // (tp * pp)
        check_batch_split(cfg, (tp, pp), dp)  # (the trainer's own check, before any rank is built)
        settings = activation_settings(cfg, i, dp)
        micro, v = settings["micro_batches"], cfg.parallel.virtual_pipeline
        wanted = set(select_ranks(ranks, tp, pp, dp))
        pieces, mems, sources = [], {}, {}
        online = i > 0 and cfg.layout(i - 1) == (tp, pp)
        stage_t0 = time.perf_counter()
        for rank in range(world):  # every rank for the coverage; memory kept for the selected ones
            with fake_rank(world, rank, tp, pp, cfg.train.seed, cfg.parallel.sequence_parallel, v):
                from megatron.core import parallel_state as ps

                want = rank_coordinates(rank, tp, pp, dp)
                got = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                       ps.get_pipeline_model_parallel_rank())
                if got != want:
                    raise DryRunError(f"stage {i}, rank {rank}: megatron placed it at (tp, dp, pp) = {got}, the dry "
                                      f"run's rank order expects {want}")
                try:
                    model, opt, rank_pieces = build_rank(cfg, shape)
                except (ConfigError, DryRunError):
                    raise
                except Exception as e:  # a module that does not build at this shape and layout
                    raise DryRunError(f"stage {i} {shape}, rank {rank} (tp, dp, pp) = {want}: building the model and "
                                      f"optimizer failed: {type(e).__name__}: {e}") from e
                pieces += [p + (rank,) for p in rank_pieces]
                if i and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                    for new, old in depth_sources(sched[i - 1][1], shape, cfg.growth.depth_init, online).items():
                        sources.setdefault(new, []).append(old)
                if rank in wanted:
                    mems[rank] = dict(memory_of(model, opt), coordinates=list(want))
                del model, opt
        keys = check_coverage(pieces, i)
        new_keys = {k: (g, d) for k, g, _, _, d, _ in pieces}
        growth = (check_growth_mapping(prev_keys, new_keys, sources, shape.layers, i) if i else None)
        prev_keys = new_keys
        formula = stage_memory(cfg.model, shape, vocab, tp, pp, dp, cfg.train.micro_batch_size,
                               cfg.parallel.distributed_optimizer, cfg.train.precision, **settings)
        acts = formula["activations"]
        worst = max(mems.values(), key=lambda m: m["total"])
        st = {"stage": i, "shape": list(shape.as_tuple()), "layout": [tp, pp, dp], "world": world,
              "ranks_built": world, "ranks_reported": sorted(mems), "checkpoint_keys": keys,
              "checkpoint_pieces": len(pieces), "micro_batches": micro, "memory": mems,
              "growth_into": growth, "growth_kind": None if not i else "online" if online else "msg-grow",
              "formula": {k: formula[k] for k in ("weights", "grads", "optimizer")},
              "activations_formula": acts, "seconds": time.perf_counter() - stage_t0}
        real = worst["weights"] + worst["grads"] + worst["optimizer"]
        form = sum(st["formula"].values())
        st["real_vs_formula"] = real / form
        if gpu_memory_gib and real + acts > gpu_memory_gib * 1024 ** 3:
            raise DryRunError(f"stage {i} {shape}, rank {max(mems, key=lambda r: mems[r]['total'])}: the real tensors "
                              f"({real / 1024 ** 3:.1f} GiB) plus the activations ({acts / 1024 ** 3:.1f} GiB, formula) "
                              f"need more than the GPU's {gpu_memory_gib:g} GiB (msg-plan's formula says "
                              f"{(form + acts) / 1024 ** 3:.1f} GiB)")
        out["stages"].append(st)
        log(_stage_line(st, worst))
    out["seconds"] = time.perf_counter() - t0
    return out


def _stage_line(st: dict, worst: dict) -> str:
    gib = 1024 ** 3
    f, g = st["formula"], st["growth_into"]
    tp, pp, dp = st["layout"]
    return (f"[dry-run] stage {st['stage']} {tuple(st['shape'])} at TP {tp} x PP {pp} x DP {dp}: {st['world']} ranks "
            f"built, checkpoint {st['checkpoint_keys']} keys in {st['checkpoint_pieces']} pieces covered exactly once; "
            f"largest rank: weights {worst['weights'] / gib:.2f} / grads {worst['grads'] / gib:.2f} / optimizer "
            f"{worst['optimizer'] / gib:.2f} GiB (formula {f['weights'] / gib:.2f} / {f['grads'] / gib:.2f} / "
            f"{f['optimizer'] / gib:.2f}; real/formula {st['real_vs_formula']:.3f}, bucket padding "
            f"{worst['bucket_padding_elements']:,} elements, {worst['replicated_params']:,} parameters replicated over TP "
            f"that the formula divides by TP); {st['micro_batches']} micro-batches per DP rank; "
            + (f"growth into it ({st['growth_kind']}): {g['grown']} tensors grown, {g['copies']} copied, {g['new']} new, "
               "every one mapped; " if g else "")
            + f"{st['seconds']:.1f} s")
