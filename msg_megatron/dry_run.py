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
import resource
import time
from typing import Dict, Optional

import torch

from .checkpoint.dist import _sharded
from .config import ConfigError
from .growth.operators import chunk_depth_plan
from .growth.stream import stage_groups
from .meta_memory import PeakMetaBytes
from .model.gpt import MaskedGPT, padded_vocab_size, stage_piece, virtual_size
from .optim.optimizer import MOMENTS, build_optimizer, cast_params, param_dtype
from .dry_run_ranks import fake_rank, rank_coordinates, ranks_to_build, select_ranks
from .training.phase_memory import phase_peaks, streamed_growth_peak
from .training.run_setup import check_batch_split
from .training.sizes import activation_settings, stage_memory


class DryRunError(RuntimeError):
    """A stage that would fail on the cluster: the message names the stage, the rank and why."""


def build_rank(cfg, shape, measure_save: bool = False):
    """This rank's model, optimizer (with its AdamW moments allocated), checkpoint pieces, and with
    `measure_save` the bytes that building the save's state dict adds on the device (meta_memory:
    measured from the tensors it creates; None otherwise)."""
    model = cast_params(MaskedGPT(cfg.model, shape, perform_init=False), param_dtype(cfg.train))
    opt = build_optimizer(model, cfg.train, cfg.parallel)
    for p in model.parameters():  # the moments AdamW's first step allocates
        rng = opt.local_range(p)
        if rng is not None:
            n = rng[1] - rng[0]
            opt.set_local_state(p, {"step": 0,
                                    **{k: torch.zeros(n, dtype=torch.float32) for k in MOMENTS}})
    with PeakMetaBytes() if measure_save else contextlib.nullcontext() as peak:
        pieces = checkpoint_pieces(model, opt)
    return model, opt, pieces, (peak.peak - peak.start if peak else None)


def checkpoint_pieces(model, opt) -> list:
    """What this rank writes into a checkpoint (checkpoint/dist._sharded, the main replicas):
    (key, global shape, global offset, local shape, dtype) per piece."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    sd, _ = _sharded(model, opt)
    apply_factories(sd)
    return [(sh.key, tuple(sh.global_shape), tuple(sh.global_offset), tuple(sh.local_shape), str(sh.dtype))
            for sh in nested_values(sd) if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id)]


def layer_and_ends_of(model) -> tuple:
    """(elements of this rank's largest layer, of its other parameters: embeddings, output layer,
    final norm), counted on the parameters built."""
    layers: Dict[str, int] = {}
    ends = 0
    for name, p in model.named_parameters():
        found = re.match(r"layers\.(\d+)\.", name)
        if found:
            layers[found.group(1)] = layers.get(found.group(1), 0) + p.numel()
        else:
            ends += p.numel()
    return max(layers.values(), default=0), ends


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
            "replicated_params": replicated, "largest_tensor": max((p.numel() for p in model.parameters()), default=0)}


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
_MOMENT_KEY = re.compile(r"^optimizer\.(exp_avg|exp_avg_sq)\.")  # a moment's key: this + its parameter's
_STATE_KEY = re.compile(r"^optimizer\.(exp_avg|exp_avg_sq|step)\.")


def check_growth_mapping(old_keys: Dict[str, tuple], new_keys: Dict[str, tuple], sources: Dict[int, list],
                         new_layers: int, stage: int, complete: bool = True) -> dict:
    """Every new layer has one source over the ranks, and every new key its source key (same rank,
    no smaller dimension). Returns counts of grown, copied and new tensors. Not `complete` (not
    every rank built): the old stage's optimizer keys are those of the ranks built, so a moment
    whose key is not among them maps through its parameter's key."""
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
        seen = src_key
        if src_key not in old_keys and not complete and _STATE_KEY.match(src_key):
            src_key, gshape = _STATE_KEY.sub("", src_key), new_keys[_STATE_KEY.sub("", key)][0]
        if src_key not in old_keys:
            raise DryRunError(f"growth into stage {stage}: `{key}` grows from `{src_key}`, which the previous stage's "
                              "checkpoint does not have")
        old_shape = old_keys[src_key][0]
        if len(old_shape) != len(gshape) or any(a > b for a, b in zip(old_shape, gshape)):
            raise DryRunError(f"growth into stage {stage}: `{key}` {gshape} cannot grow from `{src_key}` {old_shape} "
                              "(growth only adds units)")
        copied += seen in seen_sources
        grown += seen not in seen_sources
        seen_sources.add(seen)
    return {"grown": grown, "copies": copied, "new": fresh}


def model_boxes(model) -> list:
    """This rank's main model tensors as boxes of their global tensors (key, global shape, offset, local
    shape, dtype): what one DP replica's ranks hold of each tensor, before any DP slicing."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    sd = {k: v for k, v in model.sharded_state_dict(prefix="model.").items() if not k.endswith("_extra_state")}
    apply_factories(sd)
    return [(sh.key, tuple(sh.global_shape), tuple(sh.global_offset), tuple(sh.local_shape), str(sh.dtype))
            for sh in nested_values(sd) if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id)]


def check_coverage(pieces: list, stage: int, regions: Optional[Dict[str, list]] = None, what: str = "",
                   whole: bool = True) -> int:
    """Every key's main pieces tile its global tensor exactly once; returns the number of keys.
    `regions` {model key: [(offset, local shape), ...]}: each key's pieces tile instead the boxes
    of its model tensor (a moment: its parameter's; a step count: the whole) that one TP x PP
    coordinate holds, over that coordinate's DP ranks. Not `whole`: some of its DP ranks were built,
    whose pieces are checked for bounds and overlaps only."""
    by_key: Dict[str, list] = {}
    for key, gshape, off, lshape, dtype, rank in pieces:
        by_key.setdefault(key, []).append((gshape, off, lshape, dtype, rank))
    for key, items in by_key.items():
        shapes = {(g, d) for g, _, _, d, _ in items}
        if len(shapes) != 1:
            raise DryRunError(f"stage {stage}: checkpoint key `{key}` has inconsistent global shapes/dtypes {sorted(shapes)}")
        (gshape, _), = shapes
        region = [((0,) * len(gshape), gshape)]
        if regions is not None:
            base = _MOMENT_KEY.sub("", key)
            if base in regions:
                region = regions[base]
            elif not key.startswith("optimizer.step."):
                raise DryRunError(f"stage {stage}: {what} writes `{key}`, but none of its ranks holds `{base}` as its "
                                  "main copy")
        inside = lambda off, ls: any(all(b <= o and o + n <= b + m for o, n, b, m in zip(off, ls, bo, bs))  # noqa: E731
                                     for bo, bs in region)
        for g, off, ls, _, rank in items:
            if not inside(off, ls):
                raise DryRunError(f"stage {stage}, rank {rank}: `{key}` piece at {off} of {ls} lies outside "
                                  + (f"its global shape {g}" if regions is None else
                                     f"the {' and '.join(f'{bs} at {bo}' for bo, bs in region)} that {what} holds"))
        _no_overlap(key, items, stage)
        covered, whole_n = sum(math.prod(ls) for _, _, ls, _, _ in items), sum(math.prod(bs) for _, bs in region)
        if whole and covered != whole_n:
            where = f"global {gshape}" if regions is None else f"{what}'s part of {gshape}"
            raise DryRunError(f"stage {stage}: checkpoint key `{key}` ({where}) is covered by {covered} of {whole_n} "
                              "elements: a gap in what the ranks write")
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


def phases_of(mem: dict, old: Optional[dict], cfg, dp: int, per_group: int) -> dict:
    """A rank's peak bytes per phase from the tensors built: train (its state; the activations are
    the formula's), save (the state plus what building the save's state dict allocated, measured),
    and the growth into the stage, by phase_memory's rules applied to the element counts built
    (online: `old` is the same rank in the previous stage; the growth reads its units' ids, so it
    cannot itself run on meta tensors; msg-grow: the old and new layer and ends of this rank)."""
    state = mem["weights"] + mem["grads"] + mem["optimizer"]
    out = {"train": state, "save": state + mem["save_extra"]}
    t = cfg.train
    if old is not None:
        out["grow"] = phase_peaks(t.precision, dp, cfg.parallel.distributed_optimizer, mem["params"],
                                  mem["largest_tensor"], old["params"])["grow"]
    elif "old_layer" in mem:
        out["grow"] = streamed_growth_peak(mem["old_ends"], mem["ends"], mem["old_layer"], mem["layer"], per_group)
    return out


def dry_run(cfg, ranks: str = "edges", gpu_memory_gib: Optional[float] = None, log=print) -> dict:
    """Build every stage of `cfg`'s schedule rank by rank (see the module docstring)."""

    t0 = time.perf_counter()
    sched = cfg.schedule()
    vocab = padded_vocab_size(cfg.model)
    out = {"stages": [], "ranks": ranks}
    prev_keys, prev_mems = None, {}
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
        built, coords, complete = ranks_to_build(ranks, tp, pp, dp)
        pieces, boxes, mems, sources = [], {}, {}, {}
        online = i > 0 and cfg.layout(i - 1) == (tp, pp)
        stage_t0 = time.perf_counter()
        for rank in built:
            with fake_rank(world, rank, tp, pp, cfg.train.seed, cfg.parallel.sequence_parallel, v):
                from megatron.core import parallel_state as ps

                want = rank_coordinates(rank, tp, pp, dp)
                got = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                       ps.get_pipeline_model_parallel_rank())
                if got != want:
                    raise DryRunError(f"stage {i}, rank {rank}: megatron placed it at (tp, dp, pp) = {got}, the dry "
                                      f"run's rank order expects {want}")
                try:
                    model, opt, rank_pieces, save_extra = build_rank(cfg, shape, measure_save=rank in wanted)
                except (ConfigError, DryRunError):
                    raise
                except Exception as e:  # a module that does not build at this shape and layout
                    raise DryRunError(f"stage {i} {shape}, rank {rank} (tp, dp, pp) = {want}: building the model and "
                                      f"optimizer failed: {type(e).__name__}: {e}") from e
                pieces += [p + (rank,) for p in rank_pieces]
                if want[1] == 0:  # one DP replica: the model tensors' TP x PP boxes
                    boxes[rank] = model_boxes(model)
                if i and want[:2] == (0, 0):
                    for new, old in depth_sources(sched[i - 1][1], shape, cfg.growth.depth_init, online).items():
                        sources.setdefault(new, []).append(old)
                if rank in wanted:
                    mem = mems[rank] = dict(memory_of(model, opt), coordinates=list(want), save_extra=save_extra)
                    mem["layer"], mem["ends"] = layer_and_ends_of(model)
                    if i and not online:  # msg-grow streams the old stage's layers at this layout
                        mem["old_layer"], mem["old_ends"] = layer_and_ends_of(
                            MaskedGPT(cfg.model, sched[i - 1][1], perform_init=False))
                del model, opt
        if complete:
            keys = check_coverage(pieces, i)
        else:  # the model over one DP replica, the optimizer slices over every DP rank of `coords`
            keys = check_coverage([b + (r,) for r, bs in boxes.items() for b in bs], i)
            # (other coordinates' built ranks: inside their boxes and no overlap, not the whole of them)
            for t, p in sorted({rank_coordinates(r, tp, pp, dp)[::2] for r in built}):
                regions: Dict[str, list] = {}
                for k, _, off, ls, _ in boxes[t + tp * dp * p]:
                    regions.setdefault(k, []).append((off, ls))
                check_coverage([x for x in pieces if rank_coordinates(x[-1], tp, pp, dp)[::2] == (t, p)], i, regions,
                               f"the DP ranks of (tp, pp) = ({t}, {p})", whole=(t, p) in coords)
        new_keys = {k: (g, d) for k, g, _, _, d, _ in pieces}
        new_keys.update({k: (g, d) for bs in boxes.values() for k, g, _, _, d in bs if k not in new_keys})
        growth = (check_growth_mapping(prev_keys, new_keys, sources, shape.layers, i, complete) if i else None)
        prev_keys = new_keys
        formula = stage_memory(cfg.model, shape, vocab, tp, pp, dp, cfg.train.micro_batch_size,
                               cfg.parallel.distributed_optimizer, cfg.train.precision,
                               old_shape=sched[i - 1][1] if i else None, growth="online" if online else "msg-grow",
                               **settings)
        acts = formula["activations"]
        for rank, mem in mems.items():
            mem["phases"] = phases_of(mem, prev_mems.get(rank) if online else None, cfg, dp,
                                      -(-shape.layers // sched[i - 1][1].layers) if i else 1)
        worst = max(mems.values(), key=lambda m: m["total"])
        st = {"stage": i, "shape": list(shape.as_tuple()), "layout": [tp, pp, dp], "world": world,
              "ranks_built": len(built), "ranks_reported": sorted(mems), "checkpoint_keys": keys,
              "checkpoint_pieces": len(pieces), "coverage": "all" if complete else [list(c) for c in coords],
              "micro_batches": micro, "memory": mems,
              "growth_into": growth, "growth_kind": None if not i else "online" if online else "msg-grow",
              "formula": {k: formula[k] for k in ("weights", "grads", "optimizer")},
              "activations_formula": acts, "phases_formula": dict(formula["phases"], train=formula["phases"]["train"] - acts),
              "seconds": time.perf_counter() - stage_t0}
        real = worst["weights"] + worst["grads"] + worst["optimizer"]
        form = sum(st["formula"].values())
        st["real_vs_formula"] = real / form
        peaks = {ph: max(m["phases"][ph] for m in mems.values() if ph in m["phases"])
                 for ph in ("train", "save", "grow") if any(ph in m["phases"] for m in mems.values())}
        st["phases_real"] = peaks
        if gpu_memory_gib:
            cap = gpu_memory_gib * 1024 ** 3
            need = {ph: v + (acts if ph == "train" else 0) for ph, v in peaks.items()}
            over = [ph for ph, v in need.items() if v > cap]
            if over:
                ph = max(over, key=need.get)
                rank = max((r for r in mems if ph in mems[r]["phases"]), key=lambda r: mems[r]["phases"][ph])
                fp = formula["phases"][ph]
                raise DryRunError(
                    f"stage {i} {shape}, rank {rank}: its {ph} phase needs {need[ph] / 1024 ** 3:.1f} GiB from the "
                    f"tensors built" + (f" plus the activations ({acts / 1024 ** 3:.1f} GiB, formula)" if ph == "train"
                                        else "") + f", more than the GPU's {gpu_memory_gib:g} GiB (msg-plan's formula "
                    f"says {fp / 1024 ** 3:.1f} GiB)")
        prev_mems = mems
        out["stages"].append(st)
        log(_stage_line(st, worst))
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (Linux: KiB)
    return out


def _stage_line(st: dict, worst: dict) -> str:
    """A stage's report: a heading line, then one indented line per topic (under ~120 characters)."""
    gib = 1024 ** 3
    f, g = st["formula"], st["growth_into"]
    tp, pp, dp = st["layout"]
    coverage = ("over every rank" if st["coverage"] == "all" else
                "the model's over one DP replica, the optimizer's over every DP rank of (tp, pp) = "
                + ", ".join(map(str, map(tuple, st["coverage"]))))
    lines = [
        f"[dry-run] stage {st['stage']} {tuple(st['shape'])} at TP {tp} x PP {pp} x DP {dp}: {st['ranks_built']} of "
        f"{st['world']} ranks built in {st['seconds']:.1f} s, {st['micro_batches']} micro-batches per DP rank",
        f"  checkpoint: {st['checkpoint_keys']} keys covered exactly once ({coverage})",
        f"  largest rank, weights / grads / optimizer: {worst['weights'] / gib:.2f} / {worst['grads'] / gib:.2f} / "
        f"{worst['optimizer'] / gib:.2f} GiB built, {f['weights'] / gib:.2f} / {f['grads'] / gib:.2f} / "
        f"{f['optimizer'] / gib:.2f} GiB by the formula (x{st['real_vs_formula']:.3f})",
        f"    (bucket padding {worst['bucket_padding_elements']:,} elements; {worst['replicated_params']:,} parameters "
        "replicated over TP that the formula divides by TP)",
        "  peak GiB by phase, built / formula (train: the state only, without activations): "
        + ", ".join(f"{ph} {v / gib:.2f} / {st['phases_formula'][ph] / gib:.2f}" for ph, v in st["phases_real"].items()),
        f"  activations (formula only, not built): {st['activations_formula'] / gib:.2f} GiB",
    ]
    if g:
        lines.append(f"  growth into it ({st['growth_kind']}): {g['grown']} tensors grown, {g['copies']} copied, "
                     f"{g['new']} new, every one mapped")
    return "\n".join(lines)
