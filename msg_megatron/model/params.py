"""Every tensor of MaskedGPT (GPT, or BERT with model.family=bert), described once: growth, sharding,
checkpoints and HF conversion read it.

One row per parameter or buffer (names as in the single-stage state dict; `{i}` is the layer
number). A row says, per axis, which structural unit the axis is made of (its *role*), what kind
of tensor it is (how growth initialises new entries), and its name and layout in each Hugging
Face architecture. Everything else is derived from the roles:

- the tensor-parallel axis (the one whose role is split over TP ranks: vocabulary rows, heads,
  FFN units) and its partition dim (`Param.tp_axis`, also megatron's `partition_dim`);
- the unit layout along it (`unit_layout`: entries per unit and blocks, e.g. SwiGLU's [gate; up]);
- the `<head|ffn>_ids` buffer giving the units' canonical order (`ids_name`);
- which axes grow with hidden, heads or FFN units (growth/axes.py).

Adding a parameter means adding one row here. Roles:

| role       | unit                      | split over TP | grows with |
|------------|---------------------------|---------------|------------|
| `hidden`   | one feature               | no            | hidden     |
| `vocab`    | one vocabulary row        | yes (blocks)  | never      |
| `fixed`    | -                         | no            | never      |
| `qkv`      | (q+2) x head_dim rows / group | yes       | heads      |
| `heads_hd` | q x head_dim columns / group  | yes       | heads      |
| `heads`    | one entry / group         | yes           | heads      |
| `ffn`      | one FFN unit              | yes           | ffn        |
| `ffn_in`   | one FFN unit per block    | yes           | ffn        |

The attention unit is a query group: q = heads per group query heads sharing one key/value head
(grouped-query attention, model.num_query_groups; q = 1 is multi-head attention, a group per head).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

LLAMA = "llama"
GPT2 = "gpt2"
BERT = "bert"  # transformers' BertForMaskedLM (model.family=bert)


@dataclass(frozen=True)
class Role:
    units: Optional[str]  # "heads" / "ffn": the structural unit counted along the axis; None otherwise
    tp: bool  # split over tensor-parallel ranks
    # entries per unit, in head dims: q_dims per query head of the group + kv_dims (qkv: q + 2,
    # heads_hd: q); both 0: one entry per unit
    q_dims: int = 0
    kv_dims: int = 0
    gated_blocks: bool = False  # SwiGLU: the axis holds two blocks of units ([gate; up])


ROLES: Dict[str, Role] = {
    "hidden": Role(None, False),
    "vocab": Role(None, True),
    "fixed": Role(None, False),
    "qkv": Role("heads", True, q_dims=1, kv_dims=2),
    "heads_hd": Role("heads", True, q_dims=1),
    "heads": Role("heads", True),
    "ffn": Role("ffn", True),
    "ffn_in": Role("ffn", True, gated_blocks=True),
}

# the buffer holding the canonical position of each local unit (growth under TP interleaves ranks)
_IDS = {"heads": "self_attention.head_ids", "ffn": "mlp.ffn_ids"}


class Dims(NamedTuple):
    """Sizes the HF transforms need (canonical, whole tensors)."""
    heads: int
    head_dim: int
    groups: int  # key/value heads (= heads under multi-head attention)


class HF(NamedTuple):
    """A tensor's counterpart in one HF architecture: its names (templates with `{i}`), the
    transform to them (one tensor -> one per name) and back; `always`: the architecture has the
    tensor even where our model does not (GPT-2's biases): exported as zeros, imported only if zero."""
    names: Tuple[str, ...]
    to_hf: Callable[[torch.Tensor, Dims], Tuple[torch.Tensor, ...]]
    from_hf: Callable[[Tuple[torch.Tensor, ...], Dims], torch.Tensor]
    always: bool = False


def _split_qkv(t: torch.Tensor, d: Dims) -> Tuple[torch.Tensor, ...]:
    """Our fused QKV (megatron's interleaved layout: per query group [q_g,0; ..; q_g,q-1; k_g; v_g],
    head_dim rows each) -> q (heads x head_dim rows), k, v (groups x head_dim rows)."""
    q = d.heads // d.groups
    x = t.reshape(d.groups, q + 2, d.head_dim, *t.shape[1:])
    rest = t.shape[1:]
    return (x[:, :q].reshape(d.heads * d.head_dim, *rest), x[:, q].reshape(d.groups * d.head_dim, *rest),
            x[:, q + 1].reshape(d.groups * d.head_dim, *rest))


def _join_qkv(parts: Tuple[torch.Tensor, ...], d: Dims) -> torch.Tensor:
    q_, k, v = parts
    q, rest = d.heads // d.groups, q_.shape[1:]
    x = torch.cat([q_.reshape(d.groups, q, d.head_dim, *rest), k.reshape(d.groups, 1, d.head_dim, *rest),
                   v.reshape(d.groups, 1, d.head_dim, *rest)], 1)
    return x.reshape((d.heads + 2 * d.groups) * d.head_dim, *rest)


def same(name: str, always: bool = False) -> HF:
    return HF((name,), lambda t, d: (t,), lambda ts, d: ts[0], always)


def conv1d(name: str, always: bool = False) -> HF:
    """GPT-2's Conv1D stores a linear weight transposed ([in, out])."""
    return HF((name,), lambda t, d: (t.t(),), lambda ts, d: ts[0].t(), always)


def gate_up(gate: str, up: str) -> HF:
    """Our SwiGLU fc1 rows are [gate; up]."""
    return HF((gate, up), lambda t, d: t.chunk(2, 0), lambda ts, d: torch.cat(ts, 0))


def qkv_three(q: str, k: str, v: str) -> HF:
    return HF((q, k, v), _split_qkv, _join_qkv)


def qkv_c_attn(name: str, weight: bool) -> HF:
    """GPT-2's c_attn: [q (all heads); k; v] along the output axis, weight transposed (multi-head
    attention only: hf/layout.py refuses GQA for GPT-2)."""
    if weight:
        return HF((name,), lambda t, d: (torch.cat(_split_qkv(t, d), 0).t(),),
                  lambda ts, d: _join_qkv(ts[0].t().chunk(3, 0), d))
    return HF((name,), lambda t, d: (torch.cat(_split_qkv(t, d), 0),),
              lambda ts, d: _join_qkv(ts[0].chunk(3, 0), d), always=True)


@dataclass(frozen=True)
class Param:
    name: str  # state-dict name; `{i}` = layer number
    roles: Tuple[str, ...]  # one per axis
    kind: str  # linear | bias | norm | embedding | mask | birth | ids (how growth initialises new entries)
    hf: Dict[str, HF] = field(default_factory=dict)

    @property
    def tp_axis(self) -> Optional[int]:
        """The axis split over tensor-parallel ranks (megatron's `partition_dim`), None if replicated."""
        return next((a for a, r in enumerate(self.roles) if ROLES[r].tp), None)

    @property
    def is_buffer(self) -> bool:
        return self.kind in ("mask", "birth", "ids")


def _mask(prefix: str, role: str, ids: bool = False) -> List[Param]:
    """A mask's buffers (model/masks.py): value and birth step per entry, with unit ids if sharded."""
    rows = [Param(f"{prefix}_mask", (role,), "mask"), Param(f"{prefix}_birth", (role,), "birth")]
    return rows + ([Param(f"{prefix}_ids", (role,), "ids")] if ids else [])


L, H = "model.layers.{i}.", "transformer.h.{i}."  # HF layer prefixes: Llama, GPT-2
B, E, P = "bert.encoder.layer.{i}.", "bert.embeddings.", "cls.predictions."  # BERT: layer, embeddings, MLM head

TABLE: Tuple[Param, ...] = (
    *_mask("hidden", "hidden"),
    Param("embedding.weight", ("vocab", "hidden"), "embedding",
          {LLAMA: same("model.embed_tokens.weight"), GPT2: same("transformer.wte.weight"),
           BERT: same(E + "word_embeddings.weight")}),
    Param("position_embeddings.weight", ("fixed", "hidden"), "embedding",
          {GPT2: same("transformer.wpe.weight"), BERT: same(E + "position_embeddings.weight")}),
    Param("final_norm.weight", ("hidden",), "norm",
          {LLAMA: same("model.norm.weight"), GPT2: same("transformer.ln_f.weight")}),
    Param("final_norm.bias", ("hidden",), "bias", {GPT2: same("transformer.ln_f.bias")}),
    Param("output_layer.weight", ("vocab", "hidden"), "linear",
          {LLAMA: same("lm_head.weight"), GPT2: same("lm_head.weight"), BERT: same(P + "decoder.weight")}),
    # ---- BERT (model.family=bert): token types, the embedding's post-LN, the MLM head ----
    Param("token_type_embeddings.weight", ("fixed", "hidden"), "embedding", {BERT: same(E + "token_type_embeddings.weight")}),
    Param("embedding_norm.weight", ("hidden",), "norm", {BERT: same(E + "LayerNorm.weight")}),
    Param("embedding_norm.bias", ("hidden",), "bias", {BERT: same(E + "LayerNorm.bias")}),
    Param("lm_head.dense.weight", ("hidden", "hidden"), "linear", {BERT: same(P + "transform.dense.weight")}),
    Param("lm_head.dense.bias", ("hidden",), "bias", {BERT: same(P + "transform.dense.bias")}),
    Param("lm_head.norm.weight", ("hidden",), "norm", {BERT: same(P + "transform.LayerNorm.weight")}),
    Param("lm_head.norm.bias", ("hidden",), "bias", {BERT: same(P + "transform.LayerNorm.bias")}),
    Param("output_layer.bias", ("vocab",), "bias", {BERT: same(P + "bias")}),
    # BERT's sentence-order head (model.binary_head; model/bert_heads.py): BertForPreTraining's pooler and NSP head
    Param("sentence_order.dense.weight", ("hidden", "hidden"), "linear", {BERT: same("bert.pooler.dense.weight")}),
    Param("sentence_order.dense.bias", ("hidden",), "bias", {BERT: same("bert.pooler.dense.bias")}),
    Param("sentence_order.classifier.weight", ("fixed", "hidden"), "linear", {BERT: same("cls.seq_relationship.weight")}),
    Param("sentence_order.classifier.bias", ("fixed",), "bias", {BERT: same("cls.seq_relationship.bias")}),
    # ---- layer i ----
    *_mask("layers.{i}.depth", "fixed"),
    Param("layers.{i}.input_norm.weight", ("hidden",), "norm",
          {LLAMA: same(L + "input_layernorm.weight"), GPT2: same(H + "ln_1.weight")}),
    Param("layers.{i}.input_norm.bias", ("hidden",), "bias", {GPT2: same(H + "ln_1.bias")}),
    *_mask("layers.{i}.self_attention.head", "heads", ids=True),
    Param("layers.{i}.self_attention.linear_qkv.weight", ("qkv", "hidden"), "linear",
          {LLAMA: qkv_three(*(L + f"self_attn.{n}_proj.weight" for n in "qkv")),
           GPT2: qkv_c_attn(H + "attn.c_attn.weight", weight=True),
           BERT: qkv_three(*(B + f"attention.self.{n}.weight" for n in ("query", "key", "value")))}),
    Param("layers.{i}.self_attention.linear_qkv.bias", ("qkv",), "bias",
          {LLAMA: qkv_three(*(L + f"self_attn.{n}_proj.bias" for n in "qkv")),
           GPT2: qkv_c_attn(H + "attn.c_attn.bias", weight=False),
           BERT: qkv_three(*(B + f"attention.self.{n}.bias" for n in ("query", "key", "value")))}),
    Param("layers.{i}.self_attention.linear_proj.weight", ("hidden", "heads_hd"), "linear",
          {LLAMA: same(L + "self_attn.o_proj.weight"), GPT2: conv1d(H + "attn.c_proj.weight"),
           BERT: same(B + "attention.output.dense.weight")}),
    Param("layers.{i}.self_attention.linear_proj.bias", ("hidden",), "bias",
          {LLAMA: same(L + "self_attn.o_proj.bias"), GPT2: same(H + "attn.c_proj.bias", always=True),
           BERT: same(B + "attention.output.dense.bias")}),
    Param("layers.{i}.pre_mlp_norm.weight", ("hidden",), "norm",
          {LLAMA: same(L + "post_attention_layernorm.weight"), GPT2: same(H + "ln_2.weight")}),
    Param("layers.{i}.pre_mlp_norm.bias", ("hidden",), "bias", {GPT2: same(H + "ln_2.bias")}),
    *_mask("layers.{i}.mlp.ffn", "ffn", ids=True),
    Param("layers.{i}.mlp.linear_fc1.weight", ("ffn_in", "hidden"), "linear",
          {LLAMA: gate_up(L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), GPT2: conv1d(H + "mlp.c_fc.weight"),
           BERT: same(B + "intermediate.dense.weight")}),
    Param("layers.{i}.mlp.linear_fc1.bias", ("ffn_in",), "bias",
          {LLAMA: gate_up(L + "mlp.gate_proj.bias", L + "mlp.up_proj.bias"), GPT2: same(H + "mlp.c_fc.bias", always=True),
           BERT: same(B + "intermediate.dense.bias")}),
    Param("layers.{i}.mlp.linear_fc2.weight", ("hidden", "ffn"), "linear",
          {LLAMA: same(L + "mlp.down_proj.weight"), GPT2: conv1d(H + "mlp.c_proj.weight"),
           BERT: same(B + "output.dense.weight")}),
    Param("layers.{i}.mlp.linear_fc2.bias", ("hidden",), "bias",
          {LLAMA: same(L + "mlp.down_proj.bias"), GPT2: same(H + "mlp.c_proj.bias", always=True),
           BERT: same(B + "output.dense.bias")}),
    # BERT's post-LN layer: a norm after each residual add (model/layer.py, MaskedPostLNLayer)
    Param("layers.{i}.post_attention_norm.weight", ("hidden",), "norm", {BERT: same(B + "attention.output.LayerNorm.weight")}),
    Param("layers.{i}.post_attention_norm.bias", ("hidden",), "bias", {BERT: same(B + "attention.output.LayerNorm.bias")}),
    Param("layers.{i}.post_mlp_norm.weight", ("hidden",), "norm", {BERT: same(B + "output.LayerNorm.weight")}),
    Param("layers.{i}.post_mlp_norm.bias", ("hidden",), "bias", {BERT: same(B + "output.LayerNorm.bias")}),
)

_COMPILED = [(re.compile(re.escape(p.name).replace(re.escape("{i}"), r"\d+") + "$"), p) for p in TABLE]
_BY_TEMPLATE = {p.name: p for p in TABLE}
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def param(name: str) -> Param:
    """The row of tensor `name` (local or global layer numbers, or the row's own `{i}` template)."""
    if name in _BY_TEMPLATE:
        return _BY_TEMPLATE[name]
    for pattern, row in _COMPILED:
        if pattern.match(name):
            return row
    raise KeyError(f"tensor `{name}` is not described; add a row for it to msg_megatron/model/params.py")


def layer_rows() -> List[Param]:
    return [p for p in TABLE if p.name.startswith("layers.{i}.")]


def outer_rows() -> List[Param]:
    return [p for p in TABLE if not p.name.startswith("layers.{i}.")]


def unit_layout(role: str, head_dim: int, gated: bool, heads_per_group: int = 1) -> Tuple[int, int]:
    """(entries per unit, blocks) along an axis of `role`: (q + 2) x head_dim fused-QKV rows per
    query group of q heads (3 x head_dim per head under MHA), q x head_dim projection columns per
    group, 1 per FFN unit; SwiGLU's fc1 holds 2 blocks ([gate; up])."""
    r = ROLES[role]
    return ((r.q_dims * heads_per_group + r.kv_dims) * head_dim or 1), (2 if r.gated_blocks and gated else 1)


def gated_blocks(name: str) -> bool:
    """Tensor `name` holds SwiGLU's two blocks of units ([gate; up]) along its TP axis (when gated)."""
    row = param(name)
    return row.tp_axis is not None and ROLES[row.roles[row.tp_axis]].gated_blocks


def ids_name(name: str, role: str) -> str:
    """The `<head|ffn>_ids` buffer that orders the units of layer tensor `name`."""
    layer = _LAYER_RE.match(name).group(1)
    return f"layers.{layer}.{_IDS[ROLES[role].units]}"


def tp_axes(module_prefix: str) -> Dict[str, int]:
    """{buffer name: TP axis} of the sharded buffers of the module at `module_prefix` (a template,
    e.g. `layers.{i}.self_attention.`): what its sharded_state_dict declares besides megatron's own."""
    return {p.name[len(module_prefix):]: p.tp_axis for p in TABLE
            if p.is_buffer and p.tp_axis is not None and p.name.startswith(module_prefix)
            and "." not in p.name[len(module_prefix):]}
