"""AdamW on megatron-core: its DDP gradient buffers and its (distributed) optimizer.

`TrainOptimizer` owns the model's megatron `DistributedDataParallel` wrapper (contiguous fp32
gradient buffers, one reduce per bucket over the data-parallel group) and the optimizer that
`get_megatron_optimizer` builds from it: megatron's FP32Optimizer over torch AdamW, or with
`parallel.distributed_optimizer` its DistributedOptimizer, where each data-parallel rank keeps
AdamW moments for one 1/DP slice of the flattened parameters only (gradients reduce-scattered,
updated parameters all-gathered). Weight decay is skipped for biases and 1-D parameters (norms),
megatron's standard groups; the global gradient norm and clipping are megatron's too.

Precision follows the model's parameters: fp32, or bf16 (`train.precision=bf16`, megatron's
`--bf16`): bf16 parameters and activations, fp32 gradient buffers, and megatron's optimizer keeps
fp32 master weights (Float16OptimizerWithFloat16Params, or DistributedOptimizer slices) that AdamW
updates and copies back to the bf16 parameters every step.

Growth and checkpoints see the optimizer through one per-parameter interface, whatever the
sharding: `master_of(p)` / `set_master(p, w)` read and write a parameter's fp32 weights (the
master copy under bf16, else the parameter), `state_of(p)` returns a parameter's AdamW state in the parameter's own shape (under the
distributed optimizer assembled from every DP rank's slice; a collective that all DP ranks call in
the same order) and `set_state(p, state)` stores one back, each DP rank keeping its slice. So a
checkpoint holds moments in model space (reloadable under any TP/PP/DP layout, megatron's
"fully reshardable" format) and growth extends whole tensors (paper 3.2.2).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ParallelConfig, TrainConfig
from .grad_clip import clip_grad_norm_on_device

MOMENTS = ("exp_avg", "exp_avg_sq")


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig, pcfg: Optional[ParallelConfig] = None,
                    masters: Optional[dict] = None) -> "TrainOptimizer":
    """megatron's optimizer around `model` (already in its training dtype); `masters`: the fp32
    master weights by parameter name (cast_keeping_masters), else the parameters' own values."""
    opt = TrainOptimizer(model, tcfg, pcfg or ParallelConfig())
    if masters:
        for n, p in model.named_parameters():
            opt.set_master(p, masters.pop(n))
    return opt


def cast_keeping_masters(model: torch.nn.Module, dtype: torch.dtype) -> Optional[dict]:
    """Cast a model that holds fp32 weights (fresh init, init_from, growth) to `dtype`; returns
    those fp32 weights by name (None at fp32) for `build_optimizer(masters=...)`, so the
    optimizer's masters are the exact values, not their rounding."""
    masters = {n: p.detach().clone() for n, p in model.named_parameters()} if dtype != torch.float32 else None
    cast_params(model, dtype)
    return masters


def param_dtype(tcfg: TrainConfig) -> torch.dtype:
    """The parameters' dtype for train.precision (bf16-autocast keeps fp32 parameters)."""
    return torch.bfloat16 if tcfg.precision == "bf16" else torch.float32


def cast_params(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters (not buffers: mask births are step numbers that bf16 cannot hold) to `dtype`, and
    the model config's dtypes (pipeline p2p buffers) with them."""
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    cfg = model.config
    cfg.params_dtype = cfg.pipeline_dtype = dtype
    cfg.bf16 = dtype == torch.bfloat16
    return model


class TrainOptimizer:
    def __init__(self, model: torch.nn.Module, tcfg: TrainConfig, pcfg: ParallelConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer

        self.model = model
        self.distributed = bool(pcfg.distributed_optimizer)
        self.bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        self.weight_decay = tcfg.weight_decay
        _mark_shared_embedding(model)
        # grad_reduce_in_fp32: gradients accumulate and are reduced in fp32 whatever the compute dtype
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                overlap_grad_reduce=bool(pcfg.overlap_grad_reduce),
                                                use_distributed_optimizer=self.distributed)
        ocfg = OptimizerConfig(optimizer="adam", lr=tcfg.lr, min_lr=tcfg.min_lr, weight_decay=tcfg.weight_decay,
                               adam_beta1=tcfg.adam_beta1, adam_beta2=tcfg.adam_beta2, adam_eps=tcfg.adam_eps,
                               clip_grad=tcfg.clip_grad, use_distributed_optimizer=self.distributed,
                               bf16=self.bf16, fp16=False,
                               params_dtype=torch.bfloat16 if self.bf16 else torch.float32)
        with _quiet_megatron():
            self.ddp = DistributedDataParallel(model.config, ddp_cfg, model)
            self.megatron = get_megatron_optimizer(ocfg, [self.ddp])
        inner = self.megatron
        if isinstance(inner, ChainedOptimizer):
            (inner,) = inner.chained_optimizers  # dense parameters only: one optimizer
        self._inner = inner
        self.adamw = inner.optimizer  # the torch AdamW whose state is keyed by (shards of) fp32 weights
        use_fused_adamw(self.adamw)
        self._per_param_step = isinstance(self.adamw, (torch.optim.AdamW, torch.optim.Adam))
        self._group_of = {q: g for g in self.adamw.param_groups for q in g["params"]}
        # bf16 without the distributed optimizer: model parameter -> its fp32 master copy
        self._main = {}
        if self.bf16 and not self.distributed:
            for g16, g32 in zip(inner.float16_groups, inner.fp32_from_float16_groups):
                self._main.update(zip(g16, g32))
        self._dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        # megatron's schedules run every micro-batch but the last under config.no_sync_func; with
        # overlapped reduces this keeps the buckets from reducing before the gradients are complete
        model.config.no_sync_func = self.ddp.no_sync if pcfg.overlap_grad_reduce else None

    @property
    def fused_adamw(self) -> bool:
        """Whether torch's fused AdamW kernel runs the update (see use_fused_adamw)."""
        return bool(self.adamw.defaults.get("fused"))

    def describe(self) -> str:
        """Where the AdamW state lives, for the start-up log."""
        held = sum(p.numel() for g in self.adamw.param_groups for p in g["params"])
        total = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        kind = "distributed optimizer" if self.distributed else "optimizer"
        impl = f"{type(self.adamw).__module__.split('.')[0]} {type(self.adamw).__name__}"
        impl += ", fused" if self.fused_adamw else ""
        return (f"[optimizer] megatron {kind}: AdamW state for {held:,} of this rank's {total:,} parameter "
                f"elements ({held / max(total, 1):.0%}); {impl}")

    # ---- one step --------------------------------------------------------------------------
    @property
    def param_groups(self):
        return self.megatron.param_groups

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.megatron.zero_grad()

    def finish_grad_sync(self) -> None:
        """Reduce the accumulated gradients over DP (sum x 1/DP: the schedule's losses are
        pre-multiplied by DP; with overlap_grad_reduce: wait for the reduces started during the
        backward), under sequence parallelism sum the replicated norms' over TP, then sum the tied
        embedding's two copies under PP."""
        self.ddp.finish_grad_sync()
        if self.model.config.sequence_parallel:
            # norms (and row-parallel biases) saw only this rank's tokens: sum their gradients over
            # TP, megatron's own finalize step for parameters marked `sequence_parallel`
            from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

            _allreduce_non_tensor_model_parallel_grads([self.ddp], self.model.config)
        _allreduce_tied_embedding_grads(self.model)

    def step(self, lr: float) -> torch.Tensor:
        """Clip to train.clip_grad by the global norm and update; returns the gradient norm
        (before clipping) as a device tensor: megatron's step, with its norm and clipping kept on
        the device (grad_clip.py), so the step has no host sync."""
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        inner = self._inner
        if inner.prepare_grads():  # only with an fp16 loss scaler, which is not used
            raise FloatingPointError("megatron's optimizer skipped the update (inf/nan gradients)")
        grad_norm = clip_grad_norm_on_device(inner, inner.config.clip_grad)
        inner.step_with_ready_grads()
        return grad_norm

    # ---- per-parameter state (growth, checkpoints) ----------------------------------------
    def _slot(self, p: torch.nn.Parameter):
        """(the fp32 tensor torch AdamW updates for p and keys p's state by: p itself, its master
        copy, or this rank's slice of the master, (start, end) of p's flattened elements it covers),
        or None when this DP rank holds no slice of p."""
        if not self.distributed:
            return self._main.get(p, p), (0, p.numel())
        where = self._inner.model_param_group_index_map.get(p)
        if where is None:
            return None
        group, order = where
        rng = self._inner._get_model_param_range_map(p)["param"]
        return self.adamw.param_groups[group]["params"][order], (rng.start, rng.end)

    def _whole(self, p: torch.nn.Parameter, slot, local: Optional[torch.Tensor]) -> torch.Tensor:
        """A tensor of p's shape from each DP rank's slice `local` (None: no slice here): a sum over
        the DP group in which every element comes from its one owner, the others adding zeros."""
        if not self.distributed:
            return local.view_as(p)
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        if local is not None:
            start, end = slot[1]
            full[start:end] = local.reshape(-1)
        dist.all_reduce(full, group=self._dp_group)
        return full.view_as(p)

    def master_of(self, p: torch.nn.Parameter) -> torch.Tensor:
        """p's fp32 weights in p's shape (the master copy under bf16; a collective under the
        distributed optimizer)."""
        if not self.bf16:  # fp32: the parameter is the master (the distributed optimizer's slices are views of it)
            return p.detach()
        slot = self._slot(p)
        return self._whole(p, slot, slot[0].detach() if slot is not None else None)

    def set_master(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set p's fp32 weights (and p itself, rounded to its dtype)."""
        with torch.no_grad():
            p.copy_(value)
            slot = self._slot(p)
            if slot is not None and slot[0] is not p:
                start, end = slot[1]
                slot[0].copy_(value.reshape(-1)[start:end].view_as(slot[0]))

    def release_for_growth(self) -> None:
        """Before growth. Under bf16 the model's parameters become fp32 tensors holding the master
        weights, so growth starts from the exact fp32 values (not their bf16 rounding); the
        gradient buffers (and, once the parameters no longer live in them, megatron's parameter
        buffers) are freed, since the grown model gets new ones. Afterwards only `state_of` works:
        growth builds a new optimizer from it."""
        if self.bf16:
            for p in self.model.parameters():  # the same order on every DP rank (a collective)
                w = self.master_of(p)  # (assembled afresh under the distributed optimizer; else the master,
                p.data = w if self.distributed else w.clone()  # which release_weights frees later)
            cast_params(self.model, torch.float32)
        for buffer in self.ddp.buffers:
            buffer.grad_data.untyped_storage().resize_(0)
            if self.bf16 and buffer.param_data is not None:
                buffer.param_data.untyped_storage().resize_(0)
        for p in self.model.parameters():
            p.main_grad = None

    def release_weights(self) -> None:
        """During growth, once the grown model holds its copy of the weights: free the old model's
        parameter storage (the tensors keep their shapes, for `state_of`); the AdamW state stays."""
        for buffer in self.ddp.buffers:
            if buffer.param_data is not None:
                buffer.param_data.untyped_storage().resize_(0)
        for p in self.model.parameters():
            p.untyped_storage().resize_(0)
        for group in self.adamw.param_groups:  # bf16: the masters (their values are in the fp32 weights)
            for q in group["params"]:
                q.untyped_storage().resize_(0)

    def state_of(self, p: torch.nn.Parameter) -> Optional[dict]:
        """p's AdamW state {step, exp_avg, exp_avg_sq} in p's shape, or None before its first
        update. Under the distributed optimizer a collective over the DP group (exact: each
        element comes from the one rank that owns it, the others add zeros)."""
        slot = self._slot(p)
        st = self.adamw.state.get(slot[0]) if slot is not None else None
        if not self.distributed:
            if not st:
                return None
            return {"step": self._step_of(slot[0], st), **{k: st[k].view_as(p) for k in MOMENTS}}
        flag = torch.zeros(2, dtype=torch.float64, device=p.device)
        if st:
            flag[0], flag[1] = 1.0, float(self._step_of(slot[0], st))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._dp_group)
        if flag[0] == 0:
            return None
        return {"step": torch.tensor(float(flag[1])), **{k: self._whole(p, slot, st[k] if st else None)
                                                         for k in MOMENTS}}

    def set_state(self, p: torch.nn.Parameter, state: Optional[dict]) -> None:
        """Store p's state (as returned by state_of, in p's shape); None: start p afresh (AdamW
        creates its state at the next step). Takes ownership: when this rank keeps the whole
        parameter the moments are used as given (no copy; a loaded 1B checkpoint would otherwise
        hold its moments twice), a slice is copied out so the full tensor can be freed."""
        rng = self.local_range(p)
        if rng is None:
            return
        if state is None:
            self.set_local_state(p, None)
            return
        start, end = rng
        local = {"step": state["step"]}
        for k in MOMENTS:
            flat = state[k].reshape(-1)
            local[k] = flat if (start, end) == (0, flat.numel()) else flat[start:end].clone()
        self.set_local_state(p, local)

    # ---- this rank's slice (checkpoints: each DP rank writes and reads only what it holds) ----
    def local_range(self, p: torch.nn.Parameter) -> Optional[tuple]:
        """(start, end) of p's flattened elements whose master and AdamW state this rank holds
        ((0, numel) without the distributed optimizer), or None."""
        slot = self._slot(p)
        return slot[1] if slot is not None else None

    def local_master(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """The fp32 weights of p's local range, flat: a view of what the optimizer updates (loading
        into it sets the master), or None when this rank holds no slice of p."""
        slot = self._slot(p)  # (when the slot is p itself, the range is the whole of it)
        return slot[0].detach().view(-1) if slot is not None else None

    def local_state(self, p: torch.nn.Parameter) -> Optional[dict]:
        """p's AdamW state over its local range, flat views ({step, exp_avg, exp_avg_sq}), or None
        (no slice here, or before p's first update). No communication."""
        slot = self._slot(p)
        st = self.adamw.state.get(slot[0]) if slot is not None else None
        if not st:
            return None
        return {"step": self._step_of(slot[0], st), **{k: st[k].view(-1) for k in MOMENTS}}

    def set_local_state(self, p: torch.nn.Parameter, state: Optional[dict]) -> None:
        """Store p's state over its local range (flat moments of end - start elements, taken
        without a copy when already fp32 on the right device); None: start p afresh."""
        slot = self._slot(p)
        if slot is None:
            return
        key = slot[0]
        if state is None:
            self.adamw.state.pop(key, None)
            return
        moments = {k: state[k].to(key.device, torch.float32).view_as(key) for k in MOMENTS}
        if self._per_param_step:
            # torch's fused AdamW keeps its step counts on the parameters' device
            step = torch.tensor(float(state["step"]), device=key.device if self.fused_adamw else None)
            self.adamw.state[key] = {"step": step, **moments}
        else:  # fused Adams count steps per group: the group keeps the largest (see _step_of)
            self.adamw.state[key] = moments
            group = self._group_of[key]
            group["step"] = max(int(group.get("step", 0)), int(state["step"]))

    def params_from_masters(self) -> None:
        """bf16 under the distributed optimizer: round each rank's master slice into the bf16
        parameters and all-gather them over DP (what every optimizer step ends with), after the
        masters were loaded slice by slice."""
        if not (self.bf16 and self.distributed):
            return
        self._inner._copy_main_params_to_model_params()
        self.ddp.start_param_sync(force_sync=True)

    def _step_of(self, key: torch.Tensor, st: dict):
        """AdamW's step count for bias correction: per tensor in torch's AdamW (a grown tensor keeps
        its own, a new layer's starts at 0); per parameter group in TE's / apex's FusedAdam, which
        megatron uses when installed (there new layers share the group's count)."""
        if "step" in st:
            return st["step"]
        return torch.tensor(float(self._group_of[key].get("step", 0)))


def use_fused_adamw(adamw: torch.optim.Optimizer, devices=("cuda",)) -> bool:
    """Switch torch's AdamW to its fused implementation (one kernel per dtype/device group) when
    every parameter it updates is an fp32 tensor on one of `devices`. megatron uses TE's or apex's
    FusedAdam when installed; without them it builds torch's AdamW, which defaults to the
    multi-kernel `foreach` path. Same update up to rounding (tests/test_fusion.py). The CPU keeps
    the default unless asked for. Returns whether the switch was made."""
    if type(adamw) is not torch.optim.AdamW:
        return False
    params = [p for g in adamw.param_groups for p in g["params"]]
    if not params or any(p.device.type not in devices or p.dtype != torch.float32 for p in params):
        return False
    if any(adamw.state.get(p) for p in params):
        return False  # existing step counts live on the host: switch only before the first step
    for group in [adamw.defaults] + adamw.param_groups:
        group["fused"], group["foreach"] = True, False
    return True


def _mark_shared_embedding(model) -> None:
    """Tied embeddings under PP: megatron's DDP puts a parameter marked `shared_embedding` in a
    bucket of its own, so the first stage's embedding and the last stage's copy are sliced alike by
    the distributed optimizer and their gradients can be summed slice for slice."""
    if not getattr(model.mcfg, "tie_embeddings", False):
        return
    if model.pre_process:
        model.embedding.weight.shared_embedding = True
    if model.shared_output_copy():
        model.output_layer.weight.shared_embedding = True


def _allreduce_tied_embedding_grads(model) -> None:
    """Sum the embedding's and the output copy's gradients (tied embeddings, PP > 1)."""
    from megatron.core import parallel_state as ps

    if (ps.get_pipeline_model_parallel_world_size() == 1 or not model.mcfg.tie_embeddings
            or not ps.is_rank_in_embedding_group()):
        return
    weight = model.embedding.weight if model.pre_process else model.output_layer.weight
    dist.all_reduce(weight.main_grad, group=ps.get_embedding_group())


@contextlib.contextmanager
def _quiet_megatron():
    """megatron logs every bucket and parameter group at INFO when building DDP and optimizer."""
    log = logging.getLogger("megatron.core")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)
