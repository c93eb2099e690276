"""Which `transformers` architecture a model of a given config and shape exports as, or why none.

A pure function of the model config and the stage's shape (no tensors), so a run can say at its
start which stages msg-export-hf would refuse (training/run_setup.py), and the exporter (hf/) and
the importer share one set of rules. The rules are transformers' own: a config.json it would refuse
to load is never written.
"""
from __future__ import annotations

from ..config import ModelConfig, Shape
from .params import BERT, GPT2, LLAMA


class UnsupportedArchitecture(ValueError):
    """A model that has no exact `transformers` counterpart (or an HF model we cannot import)."""


def architecture(mcfg: ModelConfig, shape: Shape) -> str:
    """`llama`, `gpt2` or `bert`, or an error naming the flags that would make the model exportable."""
    flags = (mcfg.norm, mcfg.activation, mcfg.position_embedding)
    if mcfg.family == "bert":
        if (shape.heads * mcfg.head_dim != shape.hidden or mcfg.heads_per_group != 1
                or mcfg.activation not in ("gelu", "gelu_erf")):
            raise UnsupportedArchitecture(
                f"BertForMaskedLM needs heads x head_dim == hidden, multi-head attention and a GELU, but this model has "
                f"{shape.heads} x {mcfg.head_dim} (hidden {shape.hidden}), {mcfg.groups(shape)} query groups, "
                f"{mcfg.activation}; export a stage where heads x head_dim == hidden")
        return BERT
    if flags == ("rmsnorm", "swiglu", "rope"):
        if shape.hidden % shape.heads:
            # (transformers 5's LlamaConfig.validate_architecture refuses such a config.json on load,
            # although head_dim is explicit and the model itself would compute the same function)
            raise UnsupportedArchitecture(
                f"transformers' LlamaConfig needs hidden_size to be a multiple of num_attention_heads, but this model "
                f"has hidden {shape.hidden} and {shape.heads} heads; export a stage where heads divide hidden")
        return LLAMA
    if flags in (("layernorm", "gelu", "learned"), ("layernorm", "gelu_erf", "learned")):
        if shape.heads * mcfg.head_dim != shape.hidden:
            raise UnsupportedArchitecture(
                f"GPT-2 needs heads x head_dim == hidden, but this model has {shape.heads} x {mcfg.head_dim} != "
                f"{shape.hidden}; export a stage where they match, or train with model.norm=rmsnorm "
                "model.activation=swiglu model.position_embedding=rope (exported as Llama, which has head_dim)")
        if mcfg.heads_per_group != 1:
            raise UnsupportedArchitecture(
                f"GPT-2 has multi-head attention only, but this model has {mcfg.groups(shape)} query groups for "
                f"{shape.heads} heads (model.num_query_groups); train with model.norm=rmsnorm model.activation=swiglu "
                "model.position_embedding=rope (exported as Llama, with num_key_value_heads), or without groups")
        return GPT2
    raise UnsupportedArchitecture(
        f"model.norm={mcfg.norm} model.activation={mcfg.activation} model.position_embedding="
        f"{mcfg.position_embedding} has no transformers architecture; exportable are "
        "(rmsnorm, swiglu, rope) -> LlamaForCausalLM and (layernorm, gelu or gelu_erf, learned) -> GPT2LMHeadModel")


def export_warnings(mcfg: ModelConfig, schedule: list) -> list:
    """What msg-export-hf would refuse, per stage of a schedule [(step, Shape)]: said when a run
    starts rather than after it trained (one line for a model no stage of which exports)."""
    refused = []
    for i, (_, shape) in enumerate(schedule):
        try:
            architecture(mcfg, shape)
        except UnsupportedArchitecture as e:
            refused.append((i, shape, str(e)))
    if not refused:
        return []
    if len(refused) == len(schedule) and len({why for _, _, why in refused}) == 1:
        return [f"no stage of this model can be exported to transformers (msg-export-hf): {refused[0][2]}"]
    return [f"stage {i} {shape} cannot be exported to transformers (msg-export-hf): {why}" for i, shape, why in refused]
