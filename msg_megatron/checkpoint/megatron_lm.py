"""Megatron-LM `torch_dist` GPT checkpoints, read tensor by tensor in this project's canonical names.

A Megatron-LM save directory holds `latest_checkpointed_iteration.txt` ("100" or "release") and
`iter_0000100/` (or `release/`): megatron's dist_checkpointing files, `metadata.json` (written last)
and `common.pt` (`args`, `iteration`, the optimizer's param groups, ...). Tensors are stored by their
global shapes, so any TP/PP layout reads the same way; homogeneous layers are stacked on a leading
layer axis (`decoder.layers.<name>`, [num_layers, ...]); with `singleton_local_shards` (and for
non-homogeneous models) each layer has its own `decoder.layers.<i>.<name>`, SwiGLU's fc1 as `_w`/`_v` halves.

`MegatronCheckpoint.layer(i)` reads layer i alone (one box of each stacked tensor, without a
collective: torch DCP with `no_dist`, megatron's own planner), so a converter holds one layer at a
time. Megatron's QKV rows (per query group: its q heads, one k, one v), SwiGLU's [gate; up] and the
TP=1 unit order are this project's canonical layout (docs/design.md, the parameter table): the
tensors map one to one, only names differ (`LAYER_KEYS`, `OUTER_KEYS`).

Optimizer state: the model-space formats (`fully_reshardable`, and the plain optimizer's) store
`optimizer.state.{exp_avg,exp_avg_sq}.<model key>` with the model tensor's global shape, and the
fp32 master as `optimizer.state.param.<key>` (`fp32_param` for a plain mixed-precision optimizer);
AdamW's step is per parameter group in common.pt. The default distributed-optimizer format
(`dp_reshardable`: flat buckets of one DP layout) is refused with the fix.
"""
from __future__ import annotations

import ctypes
import os
import re
import warnings
from typing import Dict, Iterable, Optional

import torch

from ..model.masks import tp_rank_size
from ..model.params import outer_rows
from ..model.tp_layout import tp_shard
from .dist import CHECKPOINT_FAILURES, CheckpointError
from .megatron_args import load_common, model_from_args
from .safe_pickle import UnsafeCheckpoint, restricted_metadata_loading

TRACKER = "latest_checkpointed_iteration.txt"

# this project's name -> megatron's key (the local spec's norm names are mapped to Transformer
# Engine's fused ones by megatron itself, so both specs save these)
OUTER_KEYS = {
    "embedding.weight": "embedding.word_embeddings.weight",
    "position_embeddings.weight": "embedding.position_embeddings.weight",
    "final_norm.weight": "decoder.final_layernorm.weight",
    "final_norm.bias": "decoder.final_layernorm.bias",
    "output_layer.weight": "output_layer.weight",
}
LAYER_KEYS = {
    "input_norm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_norm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias": "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias": "self_attention.linear_proj.bias",
    "pre_mlp_norm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_norm.bias": "mlp.linear_fc1.layer_norm_bias",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
    "mlp.linear_fc1.bias": "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias": "mlp.linear_fc2.bias",
}
# per-layer keys of a checkpoint written without the TE name mapping (older megatron, some specs)
_UNFUSED = {"input_norm.weight": "input_layernorm.weight", "input_norm.bias": "input_layernorm.bias",
            "pre_mlp_norm.weight": "pre_mlp_layernorm.weight", "pre_mlp_norm.bias": "pre_mlp_layernorm.bias"}
MASTER_KEYS = ("param", "fp32_param")  # the fp32 master weights' state name (distributed / plain optimizer)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def is_megatron_lm_dir(path: str) -> bool:
    """A Megatron-LM save directory (tracker file) or one of its iteration directories."""
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, TRACKER)):
        return True
    return os.path.exists(os.path.join(path, "common.pt")) and os.path.exists(os.path.join(path, ".metadata"))


def resolve_iteration(path: str, iteration: Optional[int] = None) -> str:
    """The iteration directory of a Megatron-LM save directory (its tracker, or `iteration`), or `path` itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"Megatron-LM checkpoint `{path}` does not exist")
    if iteration is not None:
        found = os.path.join(path, f"iter_{iteration:07d}")
        if not os.path.isdir(found):
            have = sorted(d for d in os.listdir(path) if re.fullmatch(r"iter_\d{7}", d))
            raise CheckpointError(f"`{path}` has no iteration {iteration} (`{found}`); it has "
                                  + (", ".join(have) or "no iter_* directories"))
        path = found
    elif os.path.exists(os.path.join(path, TRACKER)):
        with open(os.path.join(path, TRACKER)) as f:
            text = f.read().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None:
            raise CheckpointError(f"`{os.path.join(path, TRACKER)}` holds `{text}`, neither an iteration nor "
                                  "`release`; name the iteration with --iteration N")
        path = os.path.join(path, name)
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise CheckpointError(
            f"`{path}` has no metadata.json: not a torch_dist checkpoint, or a save that did not finish "
            "(Megatron-LM writes metadata.json last). Legacy (--ckpt-format torch) checkpoints are not read: "
            "convert them with Megatron-LM's tools/checkpoint/convert.py --saver mcore first")
    return path


class MegatronCheckpoint:
    """One iteration of a Megatron-LM GPT checkpoint: its args as this project's model, tensors by name."""

    def __init__(self, path: str, iteration: Optional[int] = None, tokenizer_vocab: Optional[int] = None):
        self.path = resolve_iteration(path, iteration)
        try:
            self.common = load_common(os.path.join(self.path, "common.pt"))
        except UnsafeCheckpoint as e:
            raise CheckpointError(str(e)) from None
        self.args = self.common.get("args")
        if self.args is None:
            raise CheckpointError(f"`{self.path}/common.pt` has no `args`: only checkpoints Megatron-LM saved with "
                                  "its arguments can be read (msg-megatron takes the model's shape from them)")
        self.mcfg, self.shape = model_from_args(self.args, tokenizer_vocab)
        self.iteration = int(self.common.get("iteration", 0) or 0)
        self.release = os.path.basename(os.path.normpath(self.path)) == "release"
        from torch.distributed.checkpoint import FileSystemReader

        try:
            with restricted_metadata_loading():
                self.index = FileSystemReader(self.path).read_metadata().state_dict_metadata
        except UnsafeCheckpoint as e:
            raise CheckpointError(f"checkpoint `{self.path}` is unsafe to load: {e}") from None
        except CHECKPOINT_FAILURES as e:
            raise CheckpointError(f"cannot read the tensor index of `{self.path}`: {type(e).__name__}: {e}") from e
        self._check_model_keys()

    # ---- what is there ------------------------------------------------------------------------
    def _check_model_keys(self) -> None:
        if OUTER_KEYS["embedding.weight"] not in self.index:
            odd = sorted(k for k in self.index if not k.startswith("optimizer."))[:4]
            raise CheckpointError(f"`{self.path}` has no `{OUTER_KEYS['embedding.weight']}`: not a Megatron-LM GPT "
                                  f"checkpoint (its first keys: {odd})")
        rows = self.index[OUTER_KEYS["embedding.weight"]].size[0]
        if rows != self.padded_vocab:
            raise CheckpointError(f"`{self.path}`: the embedding has {rows} rows, args.padded_vocab_size is "
                                  f"{self.padded_vocab}")

    @property
    def padded_vocab(self) -> int:
        return int(self.args.padded_vocab_size)

    def optimizer_format(self) -> Optional[str]:
        """'model_space' (moments by model key), None (no optimizer state), or the refused format's name."""
        if any(k.startswith("optimizer.distributed.") for k in self.index):
            return (self.common.get("content_metadata") or {}).get("distrib_optim_sharding_type", "dp_reshardable")
        if any(k.startswith("optimizer.state.exp_avg.") for k in self.index):
            return "model_space"
        return None

    def optimizer_step(self) -> Optional[int]:
        """AdamW's step count from common.pt (per parameter group, or the plain optimizer's common step)."""
        opt = self.common.get("optimizer") or {}
        found = []

        def walk(x):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k in ("step", "common_step") and isinstance(v, (int, float, torch.Tensor)):
                        found.append(int(float(v)))
                    else:
                        walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)
        walk(opt)
        return max(found) if found else None

    # ---- reading ----------------------------------------------------------------------------
    def _where(self, name: str, layer: Optional[int], prefix: str = "") -> tuple:
        """(key, stacked?) of our tensor `name` (layer-relative when `layer` is given)."""
        if layer is None:
            key = prefix + OUTER_KEYS[name]
            return (key, False) if key in self.index else (None, False)
        stacked = prefix + "decoder.layers." + LAYER_KEYS[name]
        if stacked in self.index:
            return stacked, True
        for alt in (LAYER_KEYS[name], _UNFUSED.get(name)):
            key = f"{prefix}decoder.layers.{layer}.{alt}" if alt else None
            if key and self._parts(key):
                return key, False
        return None, False

    def _parts(self, key: str) -> list:
        """The stored keys of `key`: itself, or with `singleton_local_shards` SwiGLU's fc1 as its gate
        and up halves (`<key>_w`, `<key>_v`), which concatenate to the [gate; up] tensor; [] if absent."""
        if key in self.index:
            return [key]
        halves = [key + "_w", key + "_v"]
        return halves if all(h in self.index for h in halves) else []

    def _read(self, wanted: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
        """{key: (stacked layer or None)} -> tensors, this process only (no collective)."""
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner, mcore_to_pyt_state_dict
        from torch.distributed.checkpoint import FileSystemReader

        out, sd = {}, {}
        for key, layer in wanted.items():
            md = self.index[key]
            if layer is None:
                out[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
                sd[key] = [ShardedTensor.from_rank_offsets(key, out[key], replica_id=0)]
            else:
                n = md.size[0]
                buf = torch.empty((1,) + tuple(md.size[1:]), dtype=md.properties.dtype)
                sd[key] = [ShardedTensor.from_rank_offsets(key, buf, (0, layer, n), replica_id=0)]
                out[key] = buf[0]
        try:
            with restricted_metadata_loading(), warnings.catch_warnings():
                # (no_dist: this process alone reads, on purpose; torch warns that it assumes so)
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor")
                dcp.load(mcore_to_pyt_state_dict(sd, True), storage_reader=FileSystemReader(self.path),
                         planner=MCoreLoadPlanner(), no_dist=True)
        except UnsafeCheckpoint as e:
            raise CheckpointError(f"checkpoint `{self.path}` is unsafe to load: {e}") from None
        except CHECKPOINT_FAILURES as e:
            raise CheckpointError(f"cannot read {sorted(wanted)[:2]} from `{self.path}`: "
                                  f"{type(e).__name__}: {e}") from e
        return out

    def tensors(self, names: Iterable[str], layer: Optional[int] = None, state: str = "",
                fp32_masters: bool = True) -> Dict[str, torch.Tensor]:
        """Our tensors `names` (layer-relative with `layer`) as fp32 whole tensors. `state`: '' for the
        weights (the optimizer's fp32 masters when the checkpoint has them and `fp32_masters`), or
        'exp_avg' / 'exp_avg_sq'; names without that state are left out."""
        where = {}
        for name in names:
            key, stacked = None, False
            if state:
                key, stacked = self._where(name, layer, f"optimizer.state.{state}.")
            else:
                for master in (MASTER_KEYS if fp32_masters else ()):
                    key, stacked = self._where(name, layer, f"optimizer.state.{master}.")
                    if key:
                        break
                if key is None:
                    key, stacked = self._where(name, layer)
            if key is not None:
                where[name] = (self._parts(key), layer if stacked else None)
        raw = self._read({part: at for parts, at in where.values() for part in parts})
        return {name: torch.cat([raw[k] for k in parts]).float() if len(parts) > 1 else raw[parts[0]].float()
                for name, (parts, _) in where.items()}

    def model_names(self, layer: bool) -> list:
        """Our tensor names this checkpoint has: a layer's (relative) or the outer ones."""
        if layer:
            return [n for n in LAYER_KEYS if self._where(n, 0)[0] is not None]
        return [r.name for r in outer_rows() if not r.is_buffer and r.name in OUTER_KEYS
                and self._where(r.name, None)[0] is not None]

    def check_layers(self) -> None:
        """Every layer of args.num_layers is there (a stacked tensor's leading axis, or per-layer keys)."""
        for name in self.model_names(layer=True):
            key, stacked = self._where(name, 0)
            if stacked and self.index[key].size[0] != self.shape.layers:
                raise CheckpointError(f"`{key}` stacks {self.index[key].size[0]} layers, args.num_layers is "
                                      f"{self.shape.layers}")
        for i in range(self.shape.layers):
            if self._where("self_attention.linear_qkv.weight", i)[0] is None:
                raise CheckpointError(f"`{self.path}` has no layer {i} (args.num_layers={self.shape.layers})")


def fill_model(model, ck: MegatronCheckpoint, state=None) -> None:
    """Copy the Megatron-LM tensors into this rank's shard, one layer at a time; `state`: a
    PieceState to receive the AdamW moments (None: weights only)."""
    rank, tp = tp_rank_size()
    mcfg = model.mcfg
    gated = mcfg.activation == "swiglu"
    step = ck.optimizer_step() if state is not None else None
    by_layer = {}
    for local, p in model.named_parameters():
        if local.startswith("layers."):
            _, idx, rest = local.split(".", 2)
            by_layer.setdefault(model.global_layers[int(idx)], []).append((rest, p))
        else:
            canonical = "embedding.weight" if local == "output_layer.weight" and model.shared_output_copy() else local
            by_layer.setdefault(None, []).append((local, p, canonical))
    for layer in sorted(by_layer, key=lambda x: -1 if x is None else x):
        items = by_layer[layer]
        names = [it[-1] if layer is None else it[0] for it in items]
        weights = ck.tensors(names, layer)
        moments = {k: ck.tensors(names, layer, state=k) for k in MOMENT_KEYS} if state is not None else {}
        for item, name in zip(items, names):
            p = item[1]
            canonical = name if layer is None else f"layers.{layer}.{name}"
            if name not in weights:
                raise CheckpointError(f"`{ck.path}` has no tensor for `{canonical}` (args say the model has it)")
            for what, t in [("weights", weights[name])] + [(k, m[name]) for k, m in moments.items() if name in m]:
                shard = tp_shard(canonical, t, rank, tp, mcfg.head_dim, gated)
                if shard.shape != p.shape:
                    raise CheckpointError(f"`{canonical}` ({what}): the Megatron-LM tensor gives "
                                          f"{tuple(shard.shape)}, the model expects {tuple(p.shape)} (the args in "
                                          "common.pt do not match the tensors)")
                if what == "weights":
                    with torch.no_grad():
                        p.copy_(shard)
                else:
                    moments[what][name] = shard
            if state is not None and all(name in m for m in moments.values()):
                state.set_local_state(p, {"step": float(step or 0), **{k: moments[k][name] for k in MOMENT_KEYS}})
        del weights, moments
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the layer's freed read buffers back to the kernel before the next layer: glibc keeps
    freed heap blocks (after a large free its mmap threshold rises), so each layer's buffers would
    stay in the resident set and the import's peak would grow with the depth (measured at TP2, 123M
    parameters: 1.23x the training step's peak without this, 1.13x with it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
