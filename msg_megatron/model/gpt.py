"""Decoder-only GPT with MSG masks, built from megatron-core parts.

Activations are [sequence, batch, hidden] as in megatron. The hidden mask m_h multiplies the
embedding output, every sublayer output and every norm output (DESIGN.md, paper eq. 12/19), so
while m_h is 0 on new features the grown model computes exactly the old function.
"""
from __future__ import annotations

import math
import zlib
from functools import partial
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from ..config import ModelConfig, Shape
from ..config.checks import check_bert
from ..ops import fused
from ..parallel.setup import device, sequence_parallel
from . import recompute
from . import scores as scores_mod
from .attention import rope_cos_sin
from .bert_heads import MLMHead, SentenceOrderHead
from .masks import Mask
from .norms import MaskedLayerNorm, norm_class
from .params import param
from .spec import masked_layer_spec, masked_post_ln_layer_spec


def padded_vocab_size(mcfg: ModelConfig) -> int:
    """Embedding rows: the vocabulary padded to `make_vocab_size_divisible_by`. Unlike megatron
    (which pads to a multiple of divisible_by x TP), the padding does not depend on the TP degree,
    so a checkpoint keeps its shapes when it is resumed under another layout; the config check
    requires the padded size to divide by parallel.tensor."""
    multiple = mcfg.make_vocab_size_divisible_by
    return int(math.ceil(mcfg.vocab_size / multiple) * multiple)


def stage_piece(shape: Shape) -> "Piece":
    """The whole of this rank's pipeline stage of a model of `shape`: its layers, which under an
    interleaved pipeline (V chunks per rank) are chunk c = virtual stage c x PP + rank, in megatron's
    order (PP=2, V=2, 8 layers: rank 0 holds 0, 1, 4, 5; rank 1 holds 2, 3, 6, 7)."""
    pp_rank, pp = pp_rank_size()
    v = virtual_size()
    n = shape.layers // (pp * v)
    layers = tuple(g for c in range(v) for g in range((c * pp + pp_rank) * n, (c * pp + pp_rank + 1) * n))
    return Piece(layers, pp_rank == 0, pp_rank == pp - 1)


def virtual_size() -> int:
    """Chunks per pipeline rank (parallel.virtual_pipeline; 1 without interleaving)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1
    return ps.get_virtual_pipeline_model_parallel_world_size() or 1


def pp_rank_size():
    """(pipeline-parallel rank, size); (0, 1) before megatron's parallel state exists."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()


def _seed_module(seed: int, tag: str) -> None:
    """Each module draws its initial weights from its own seed (embedding, layer i, output), so
    a pipeline stage that builds only some modules gets the same weights as a single rank."""
    torch.manual_seed((seed * 1_000_003 + zlib.crc32(tag.encode())) % (2**63))


def transformer_config(mcfg: ModelConfig, shape: Shape, perform_init: bool = True) -> TransformerConfig:
    """megatron's TransformerConfig for one stage's shape (head dim fixed at model.kv_channels),
    with the process's tensor-parallel degree and sequence parallelism (parallel/setup.py)."""
    from megatron.core import parallel_state as ps

    std = mcfg.init_method_std
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    _, pp = pp_rank_size()
    v = virtual_size()
    return TransformerConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel() and tp > 1,
        # the interleaved schedule reads both (its micro-batch groups default to PP)
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=v if v > 1 else None,
        # interleaved: Megatron-LM's defaults, overlapped unbatched p2p. (Batched, a 2-rank pipeline
        # posts two sends to the same peer in one batch, the activation and the gradient, which the
        # peer's receives can match the wrong way round: seen on gloo as corrupted activations.
        # megatron's unbatched ops put the two directions on two process groups.)
        overlap_p2p_comm=v > 1, batch_p2p_comm=v <= 1,
        num_layers=shape.layers, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads, kv_channels=mcfg.head_dim, num_query_groups=mcfg.groups(shape),
        normalization="RMSNorm" if mcfg.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=mcfg.norm_epsilon, gated_linear_unit=mcfg.activation == "swiglu",
        # (read by our MLP and MLM head, which apply it with the FFN mask: ops/fused.py)
        activation_func=F.gelu if mcfg.activation == "gelu_erf" else partial(F.gelu, approximate="tanh"),
        add_bias_linear=mcfg.add_bias_linear, init_method_std=std,
        init_method=lambda w: nn.init.normal_(w, 0.0, std),
        # GPT-2 style scaled init of the residual-output projections (megatron's default)
        output_layer_init_method=lambda w: nn.init.normal_(w, 0.0, std / math.sqrt(2.0 * shape.layers)),
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=perform_init,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        pipeline_dtype=torch.float32,  # activations sent between pipeline stages
    )


class Piece(NamedTuple):
    """Part of a pipeline stage for code that streams a model (msg-grow): the global numbers of
    the layers it holds, and whether it holds the stage's embeddings / final norm and output."""
    layers: Tuple[int, ...]
    pre_process: bool
    post_process: bool


class MaskedGPT(MegatronModule):
    """The GPT, or under pipeline parallelism one stage of it: the first stage holds the embeddings,
    the last the final norm and output layer, every stage `layers / PP` consecutive layers (state
    dict names are local, `layers.0...`; checkpoints use global layer numbers). The hidden mask
    lives on every stage. With tied embeddings and PP > 1 the last stage keeps a copy of the
    embedding as its output weight (marked `shared`), kept equal by summing the two gradients.

    `piece`: build only part of this rank's stage (some of its layers, with or without its ends);
    its state dict and sharded state dict are those parts of the stage's, under the same keys."""

    def __init__(self, mcfg: ModelConfig, shape: Shape, perform_init: bool = True, seed: int = 1234,
                 piece: Optional[Piece] = None, layer_spec: Optional[ModuleSpec] = None):
        config = transformer_config(mcfg, shape, perform_init)
        super().__init__(config=config)
        self.mcfg, self.shape = mcfg, shape
        # the whole stage: under an interleaved pipeline its V chunks, each a run of consecutive
        # layers (a piece, msg-grow's, is built without interleaving: one chunk)
        self.chunks = virtual_size() if piece is None else 1
        if piece is None:
            piece = stage_piece(shape)
        self.pre_process, self.post_process = piece.pre_process, piece.post_process
        self.global_layers = tuple(piece.layers)
        self.local_layers = len(self.global_layers)
        self.vocab_padded = padded_vocab_size(mcfg)
        self.bert = mcfg.family == "bert"  # a bidirectional post-LN encoder with BERT's MLM head
        check_bert(mcfg)
        self.share_embeddings_and_output_weights = mcfg.tie_embeddings
        self.input_tensor = None
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        if self.pre_process:
            _seed_module(seed, "embedding")
            # sequence parallelism without learned positions: megatron's reduce-scatter of the embedding
            # output ([s/TP, b, h] per rank) instead of an all-reduce and a split (LanguageModelEmbedding)
            self.embedding = VocabParallelEmbedding(
                self.vocab_padded, shape.hidden, init_method=config.init_method, config=config,
                reduce_scatter_embeddings=config.sequence_parallel and mcfg.position_embedding != "learned")
            if mcfg.position_embedding == "learned":
                self.position_embeddings = nn.Embedding(mcfg.seq_length, shape.hidden)
                if perform_init:
                    config.init_method(self.position_embeddings.weight)
            if self.bert:  # segment A/B embeddings and the embedding's LayerNorm (post-LN)
                self.token_type_embeddings = nn.Embedding(mcfg.type_vocab_size, shape.hidden)
                if perform_init:
                    config.init_method(self.token_type_embeddings.weight)
                self.embedding_norm = MaskedLayerNorm(config, shape.hidden, mcfg.norm_epsilon)
        spec = layer_spec or (masked_post_ln_layer_spec() if self.bert else masked_layer_spec(mcfg.norm))
        layers = []
        for g in self.global_layers:
            _seed_module(seed, f"layer{g}")
            layers.append(build_module(spec, config=config, layer_number=g + 1))
        self.layers = nn.ModuleList(layers)
        if self.post_process:
            if self.bert:  # post-LN: the layers' outputs are normalised already; the MLM head's transform
                _seed_module(seed, "lm_head")
                self.lm_head = MLMHead(config, shape.hidden, mcfg.norm_epsilon, perform_init)
                if mcfg.binary_head:
                    _seed_module(seed, "sentence_order")
                    self.sentence_order = SentenceOrderHead(config, shape.hidden, perform_init)
            else:
                self.final_norm = norm_class(mcfg.norm)(config, shape.hidden, mcfg.norm_epsilon)
            tied_here = mcfg.tie_embeddings and self.pre_process
            # the untied output layer, or (tied, PP > 1) the copy of the embedding: same draw as the embedding
            _seed_module(seed, "embedding" if mcfg.tie_embeddings else "output")
            self.output_layer = ColumnParallelLinear(
                shape.hidden, self.vocab_padded, config=config, init_method=config.init_method, bias=self.bert,
                gather_output=False, skip_weight_param_allocation=tied_here)
            if self.bert:  # the decoder bias: split by vocabulary rows, each rank's gradient complete (no SP sum)
                self.output_layer.bias.sequence_parallel = False
            if mcfg.tie_embeddings and not tied_here:
                self.output_layer.weight.shared = True  # a duplicate: not counted in norms/params
        self.mask_hidden = Mask(self, "hidden", shape.hidden)
        self._rope = None
        _mark_tensor_parallel_weights(self)

    def shared_output_copy(self) -> bool:
        """True on the last stage of a PP > 1 model with tied embeddings."""
        return self.post_process and self.mcfg.tie_embeddings and not self.pre_process

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's pipeline schedules with the previous stage's output."""
        self.input_tensor = _one_tensor(input_tensor)

    def chunk_views(self) -> list:
        """The stage's virtual pipeline stages as modules for megatron's interleaved schedule."""
        return [ModelChunk(self, c) for c in range(self.chunks)]

    def rope(self, seq_len: int, dtype: torch.dtype = torch.float32):
        """(cos, sin) for the first `seq_len` positions in the activations' dtype (computed in fp32,
        cast as megatron does), cached: one table per forward for all layers, no per-layer cast."""
        if self.mcfg.position_embedding != "rope":
            return None
        dev = self.layers[0].input_norm.weight.device if len(self.layers) else torch.device("cpu")
        if (self._rope is None or self._rope[0].shape[0] < seq_len or self._rope[0].device != dev
                or self._rope[0].dtype != dtype):
            cos, sin = rope_cos_sin(max(seq_len, self.mcfg.seq_length), self.mcfg.head_dim, self.mcfg.rotary_base)
            self._rope = cos.to(dev, dtype), sin.to(dev, dtype)
        return self._rope[0][:seq_len], self._rope[1][:seq_len]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor = None, chunk: Optional[int] = None,
                input_tensor: Optional[torch.Tensor] = None, types: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, sentence_order: Optional[torch.Tensor] = None,
                scores: bool = False, logits_at: Optional[torch.Tensor] = None):
        """tokens [b, s] -> logits [b, s, vocab_padded], or per-token losses [b, s] given labels; on a
        stage other than the last, the hidden states [s, b, h] for the next stage. `chunk`: run only
        that virtual pipeline stage of this rank (ModelChunk), on `input_tensor` unless it is the
        first; None: all of the stage's layers in order. BERT: `types` [b, s] the segment of each
        token (default 0), `padding_mask` [b, s] 1 on real tokens, 0 on padding (default all 1),
        which attention does not attend to. With model.binary_head also the sentence-order logits
        [b, 2] (a pair: (logits, order logits)), or given labels and `sentence_order` [b] (1: segments
        swapped) the pair (per-token losses, per-sample order losses [b]).
        Evaluation (model/scores.py; GPT): `scores=True` with labels, [b, s, 2] (log p(label), label is
        the argmax); `logits_at` [b] positions, the full-vocabulary logits there [b, vocab_padded]."""
        if chunk is None and self.chunks > 1:
            raise RuntimeError("an interleaved pipeline stage runs one chunk at a time (its layers are not "
                               "consecutive): go through run_microbatches / chunk_views()")
        n = self.local_layers // self.chunks
        layers = self.layers if chunk is None else self.layers[chunk * n:(chunk + 1) * n]
        first = self.pre_process and chunk in (None, 0)
        last = self.post_process and chunk in (None, self.chunks - 1)
        b, s = tokens.shape
        if s > self.mcfg.seq_length and self.mcfg.position_embedding == "learned":
            raise ValueError(f"sequence of {s} tokens is longer than model.seq_length={self.mcfg.seq_length}")
        hmask = self.mask_hidden.output()
        sp = self.config.sequence_parallel
        if sp and s % self.config.tensor_model_parallel_size:
            raise ValueError(f"a sequence of {s} tokens does not split over parallel.tensor="
                             f"{self.config.tensor_model_parallel_size} ranks (parallel.sequence_parallel)")
        if first:
            x = self.embedding(tokens)  # [b, s, h], or reduce-scattered: [s/TP, b, h], this rank's tokens
            if not self.embedding.reduce_scatter_embeddings:
                x = x.transpose(0, 1).contiguous()  # [s, b, h]; p2p sends need contiguous
                if self.mcfg.position_embedding == "learned":
                    x = x + self.position_embeddings(torch.arange(s, device=tokens.device))[:, None, :]
                if self.bert:
                    seg = torch.zeros_like(tokens) if types is None else types
                    x = x + self.token_type_embeddings(seg).transpose(0, 1)
                if sp:  # this rank's part of the sequence; a copy, so the whole [s, b, h] can be freed
                    x = scatter_to_sequence_parallel_region(x).clone()
        else:
            x = self.input_tensor if chunk is None else input_tensor
        if hmask is not None:
            # masks stay fp32 buffers (birth steps need the precision); multiply in the activations' dtype
            hmask = hmask.to(x.dtype)
            if first and not self.bert:
                x = x * hmask
        if first and self.bert:  # LN(.; m_h) re-masks its output (eq. 19)
            x = self.embedding_norm(x, hmask)
        attn_mask = None
        if self.bert and padding_mask is not None:  # keys to attend to: [b, 1, 1, s]
            attn_mask = padding_mask.to(torch.bool)[:, None, None, :]
        rope = self.rope(s, x.dtype)
        cos, sin = rope if rope is not None else (None, None)
        # (per chunk under an interleaved pipeline: megatron recomputes per virtual stage)
        recomputed = recompute.full_layers(self.config, len(layers)) if self.training else 0
        for i, layer in enumerate(layers):
            if i < recomputed:  # train.recompute=full: keep only the layer's input (model/recompute.py)
                x = recompute.checkpoint(_run_layer(layer), x, hmask, cos, sin, attn_mask)
            else:
                x = layer(x, hmask, rope, attn_mask)
        if not last:
            return x.contiguous()
        order = self.sentence_order(x, hmask) if self.mcfg.binary_head else None  # [b, 2]
        x = self.lm_head(x, hmask) if self.bert else self.final_norm(x, hmask)
        weight = self.embedding.weight if (self.mcfg.tie_embeddings and self.pre_process) else None
        logits, _ = self.output_layer(x, weight=weight)  # [s, b, v / TP] (under SP it gathers the sequence)
        if logits_at is not None:
            return scores_mod.logits_at(logits, logits_at)
        if scores:
            return scores_mod.token_scores(logits, labels.transpose(0, 1)).transpose(0, 1)
        if labels is None:  # full-vocabulary logits on every TP rank
            logits = gather_from_tensor_model_parallel_region(logits).transpose(0, 1)
            return logits if order is None else (logits, order)
        loss = fused.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)
        if order is None:
            return loss
        if sentence_order is None:
            raise ValueError("model.binary_head: the sentence-order labels (`sentence_order`, [b]) are needed with "
                             "`labels`")
        return loss, F.cross_entropy(order.float(), sentence_order, reduction="none")

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's default, plus: layers under their global numbers, the hidden mask saved by the
        first stage only (a replica elsewhere), and the tied output copy stored as the embedding."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
            sharded_state_dict_default,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = ps.get_tensor_model_parallel_group()
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(own, prefix, sharded_offsets=sharded_offsets,
                                                  dp_cp_group=metadata["dp_cp_group"], tp_group=tp_group)
        pp_rank, _ = pp_rank_size()
        for sh in out.values():
            sh.replica_id = (pp_rank,) + tuple(sh.replica_id[1:])
        for name, child in self.named_children():
            if name == "layers":
                for i, layer in enumerate(self.layers):
                    local, glob = f"{prefix}layers.{i}.", f"{prefix}layers.{self.global_layers[i]}."
                    lsd = sharded_state_dict_default(layer, local, sharded_offsets, metadata, tp_group=tp_group)
                    replace_prefix_for_sharding(lsd, local, glob)
                    out.update(lsd)
                continue
            # tp_group: a replicated tensor (final norm) must be a replica on TP ranks > 0
            sub = sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group)
            if name == "output_layer" and self.shared_output_copy():
                for sh in sub.values():
                    if hasattr(sh, "key") and sh.key == f"{prefix}output_layer.weight":
                        sh.key = f"{prefix}embedding.weight"
                        # a replica of the first stage's embedding (on the first stage itself only in
                        # a piece without the embedding: then it is what this rank reads and writes)
                        sh.replica_id = (int(pp_rank != 0),) + tuple(sh.replica_id[1:])
            out.update(sub)
        return out


class ModelChunk(nn.Module):
    """One virtual pipeline stage (chunk) of this rank's MaskedGPT, as megatron's interleaved
    schedule wants its model: a list of modules with `set_input_tensor`, `config` and `model_type`.
    A view: the parameters stay the MaskedGPT's (one module for the optimizer, checkpoints and
    growth), not registered here."""

    def __init__(self, model: MaskedGPT, index: int):
        super().__init__()
        object.__setattr__(self, "_gpt", model)  # (not a submodule)
        self.index = index
        self.input_tensor = None
        self.model_type = model.model_type

    @property
    def config(self):
        return self._gpt.config

    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = _one_tensor(input_tensor)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor = None, **kwargs):
        return self._gpt(tokens, labels, chunk=self.index, input_tensor=self.input_tensor, **kwargs)


def _one_tensor(input_tensor):
    """megatron's schedules hand a stage its input as a list of one tensor (or the tensor)."""
    return input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor


def _run_layer(layer):
    """The layer as a function of tensors only (megatron's checkpoint saves its tensor arguments)."""
    def run(x, hmask, cos, sin, attn_mask):
        return layer(x, hmask, None if cos is None else (cos, sin), attn_mask)

    return run


def _mark_tensor_parallel_weights(model: nn.Module) -> None:
    """megatron marks a TP-sharded weight (`tensor_model_parallel`, `partition_dim`) only when it
    initialises it; a model built with perform_initialization=False (resume, growth) would have its
    shards taken for replicated tensors by the gradient norm and parameter count. Mark every
    parameter the table (model/params.py) says is split over TP ranks."""
    for name, p in model.named_parameters():
        axis = param(name).tp_axis
        if axis is not None and not hasattr(p, "tensor_model_parallel"):
            p.tensor_model_parallel = True
            p.partition_dim = axis
            p.partition_stride = 1


def sync_tied_output(model: "MaskedGPT") -> None:
    """Make the last stage's output copy equal the first stage's embedding (PP > 1, tied): the copy
    is zeroed and summed with the embedding over megatron's embedding group (first + last stage)."""
    from megatron.core import parallel_state as ps

    _, pp = pp_rank_size()
    if pp == 1 or not model.mcfg.tie_embeddings or not ps.is_rank_in_embedding_group():
        return
    weight = model.embedding.weight if model.pre_process else model.output_layer.weight
    with torch.no_grad():
        if not model.pre_process:
            weight.zero_()
        torch.distributed.all_reduce(weight.data, group=ps.get_embedding_group())


def build_model(mcfg: ModelConfig, shape: Shape, seed: int = 1234, perform_init: bool = True,
                layer_spec: Optional[ModuleSpec] = None) -> MaskedGPT:
    model = MaskedGPT(mcfg, shape, perform_init, seed=seed, layer_spec=layer_spec).to(device())
    if perform_init:
        sync_tied_output(model)
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of the whole model: summed over tensor- and pipeline-parallel ranks, replicated
    ones and the tied output copy counted once (a collective under TP/PP: call it on every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    if not ps.model_parallel_is_initialized() or ps.get_model_parallel_group().size() == 1:
        return sum(p.numel() for p in model.parameters())

    n = torch.tensor(sum(p.numel() for p in model.parameters()
                         if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)),
                     dtype=torch.float64, device=device())
    torch.distributed.all_reduce(n, group=ps.get_model_parallel_group())
    return int(n)
