"""How big a model's state is per process: parameters (exactly the instantiated model's), the
largest tensor, one layer and the ends, and the bytes of each phase per GPU (msg-plan prints
them; the host-memory check and msg-grow's preflight read them). Estimates for planning; the
per-phase rules are training/phase_memory.py's."""
from __future__ import annotations

from typing import Optional

from ..config import ModelConfig, Shape
from .phase_memory import bytes_per_param, optimizer_bytes, phase_peaks, streamed_growth_peak


def count_params(mcfg: ModelConfig, shape: Shape, vocab_padded: int) -> int:
    """Parameters of MaskedGPT at `shape` (equal to sum(p.numel()) of the built model)."""
    h, f, a, n = shape.as_tuple()
    d, g = mcfg.head_dim, mcfg.groups(shape)
    bias = mcfg.add_bias_linear
    norm = 2 * h if mcfg.norm == "layernorm" else h
    f_in = 2 * f if mcfg.activation == "swiglu" else f
    qkv = (a + 2 * g) * d  # query heads + one key and one value head per group
    layer = (2 * norm + qkv * h + a * d * h + f_in * h + f * h
             + (qkv + h + f_in + h if bias else 0))
    total = n * layer + vocab_padded * h + norm  # (BERT: the embedding's LN in place of the final norm)
    if mcfg.position_embedding == "learned":
        total += mcfg.seq_length * h
    if not mcfg.tie_embeddings:
        total += vocab_padded * h
    if mcfg.family == "bert":  # token types; the MLM head's dense and LN; the decoder bias
        total += mcfg.type_vocab_size * h + h * h + h + norm + vocab_padded
    if mcfg.binary_head:  # the sentence-order head: pooler dense, 2-way classifier
        total += h * h + h + 2 * h + 2
    return total


def params_per_gpu(mcfg: ModelConfig, shape: Shape, vocab_padded: int, tp: int, pp: int) -> float:
    """Parameters held by one rank of the most loaded pipeline stage (the first: its layers plus the
    embeddings), sharded over TP; the whole model / TP at PP=1."""
    h, f, a, n = shape.as_tuple()
    total = count_params(mcfg, shape, vocab_padded)
    if pp == 1:
        return total / tp
    outer = count_params(mcfg, Shape(h, f, a, 0), vocab_padded)  # embeddings, output layer, final norm
    embed = vocab_padded * h + (mcfg.seq_length * h if mcfg.position_embedding == "learned" else 0)
    return ((total - outer) / n * (n // pp) + embed) / tp


def largest_tensor(mcfg: ModelConfig, shape: Shape, vocab_padded: int, tp: int) -> float:
    """Elements of the largest local tensor (the embedding, or fc1 / QKV of a wide model)."""
    h, f, a, _ = shape.as_tuple()
    f_in = 2 * f if mcfg.activation == "swiglu" else f
    return max(vocab_padded * h, f_in * h, (a + 2 * mcfg.groups(shape)) * mcfg.head_dim * h, f * h) / tp


def kv_cache_bytes(mcfg: ModelConfig, shape: Shape, seq: Optional[int] = None, elem: int = 2) -> float:
    """Inference KV cache of one sequence of `seq` tokens (default model.seq_length): a key and a
    value of head_dim per query group, token and layer (grouped-query attention divides it by the
    heads per group)."""
    return 2.0 * mcfg.groups(shape) * mcfg.head_dim * shape.layers * (seq or mcfg.seq_length) * elem


def layer_and_ends(mcfg: ModelConfig, shape: Shape, vocab_padded: int, tp: int, pp: int) -> tuple:
    """(elements of one layer, of the most loaded stage's ends: embeddings / output layer) per rank."""
    h, f, a, n = shape.as_tuple()
    outer = count_params(mcfg, Shape(h, f, a, 0), vocab_padded)
    layer = (count_params(mcfg, shape, vocab_padded) - outer) / max(n, 1) / tp
    embed = vocab_padded * h + (mcfg.seq_length * h if mcfg.position_embedding == "learned" else 0)
    return layer, (outer if pp == 1 else embed) / tp


def msg_grow_peak(mcfg: ModelConfig, old: Shape, new: Shape, vocab_padded: int, tp: int, pp: int) -> float:
    """Peak bytes per process of msg-grow old -> new at TP x PP (phase_memory.streamed_growth_peak)."""
    layer_old, ends_old = layer_and_ends(mcfg, old, vocab_padded, tp, pp)
    layer_new, ends_new = layer_and_ends(mcfg, new, vocab_padded, tp, pp)
    return streamed_growth_peak(ends_old, ends_new, layer_old, layer_new, -(-new.layers // old.layers))


def layer_activation_bytes(mcfg: ModelConfig, shape: Shape, micro_batch: int, tp: int, elem: int = 2,
                           sequence_parallel: bool = False) -> float:
    """Activations one layer of MaskedGPT keeps for its backward, per micro-batch of b sequences,
    with flash attention (no s x s term), masks folded, in elements of `elem` bytes:
        s*b*(6h + ((3a + 3g)*d + a + F_in + F*(2 if SwiGLU else 1)) / TP)
    and with sequence parallelism s*b*(6h + ...) / TP: the norms see s/TP tokens, and megatron's
    column-parallel linears keep their input as the sequence shard (gathered again in the backward).
    Counted from the tensors autograd saves (tests/test_recompute.py measures them): per norm its
    input, normalised input and output (3h, and 1/token statistics, dropped); the rotated q and k
    ((a + g)d, g = query groups: g = a under MHA), the fused QKV output that v is a view of
    ((a + 2g)d), the attention's log-sum-exp (a), the
    projection's input (ad); fc1's output (F_in) and the activation's output(s) (F, SwiGLU 2F).
    megatron's count for its own layer is s*b*(4h + (4ad + F_in + F*g)/TP)."""
    h, f, a, _ = shape.as_tuple()
    f_in = 2 * f if mcfg.activation == "swiglu" else f
    s, b = mcfg.seq_length, micro_batch
    gated = 2 if mcfg.activation == "swiglu" else 1
    outside = 6 * h / tp if sequence_parallel else 6 * h  # the norms' tensors, between the TP regions
    qkv = (3 * a + 3 * mcfg.groups(shape)) * mcfg.head_dim
    return elem * s * b * (outside + (qkv + a + f_in + f * gated) / tp)


def activation_bytes(mcfg: ModelConfig, shape: Shape, vocab_padded: int, tp: int, pp: int, micro_batch: int,
                     recompute: str = "none", recompute_layers: int = 0, elem: int = 2,
                     sequence_parallel: bool = False, virtual_pipeline: int = 1,
                     micro_batches: Optional[int] = None) -> float:
    """Peak activation bytes on the most loaded pipeline stage (the first: under 1F1B it holds PP
    micro-batches in flight of its n/PP layers). train.recompute=full keeps, for each of its first
    k = recompute_layers (0: all) layers, only the layer's input (s*b*h elements); one layer's
    activations exist again while it is recomputed; selective recomputes core attention, whose s x s
    probabilities flash attention does not store anyway (no change here). Sequence parallelism
    divides what lives between the TP regions by TP, the recomputed layers' kept inputs included.
    Under an interleaved pipeline (V chunks of n/(PP*V) layers per rank; recompute_layers counts
    per chunk, as megatron recomputes per virtual stage) the first rank holds the chunk forwards of
    megatron's warm-up, 2(PP - 1) + (V - 1)PP, plus the one in its backward: at most V x the
    `micro_batches` per step."""
    h, n = shape.hidden, shape.layers
    s, b = mcfg.seq_length, micro_batch
    chunk = n // (pp * virtual_pipeline)
    k = min(recompute_layers or chunk, chunk) if recompute == "full" else 0
    layer = layer_activation_bytes(mcfg, shape, micro_batch, tp, elem, sequence_parallel)
    inputs = k * elem * s * b * h / (tp if sequence_parallel else 1)
    per_micro = (chunk - k) * layer + inputs  # one chunk's forward (the whole stage without interleaving)
    in_flight = pp
    if virtual_pipeline > 1:
        in_flight = 2 * (pp - 1) + (virtual_pipeline - 1) * pp + 1
        if micro_batches:
            in_flight = min(in_flight, virtual_pipeline * micro_batches)
    # the micro-batch in its backward: its forward's activations (with PP = 1 also the logits and
    # their gradient, 4 x s*b*V/TP bytes in fp32), or later, while a recomputed layer reruns (the
    # loss's tensors and the layers above it freed), the kept inputs plus that one layer's
    logits = 4 * s * b * vocab_padded / tp if pp == 1 else 0
    return (in_flight - 1) * per_micro + max(per_micro + logits, inputs + layer if k else 0)


def activation_settings(cfg, stage: int, dp: int) -> dict:
    """What the activation count reads from a config for growth stage `stage` at its layout and DP
    degree: the keyword arguments of activation_bytes and stage_memory (msg-plan, its dry run and
    the benchmark read them here, so all three count the same run)."""
    tp, pp = cfg.layout(stage)
    t, p = cfg.train, cfg.parallel
    return dict(recompute=t.recompute, recompute_layers=t.recompute_num_layers,
                sequence_parallel=p.sequence_parallel and tp > 1, virtual_pipeline=p.virtual_pipeline if pp > 1 else 1,
                micro_batches=cfg.batch_size(stage) // (t.micro_batch_size * dp))


def stage_memory(mcfg: ModelConfig, shape: Shape, vocab_padded: int, tp: int, pp: int, dp: int,
                 micro_batch: int, distributed_optimizer: bool = True, precision: str = "bf16",
                 old_shape: Optional[Shape] = None, growth: str = "online", recompute: str = "none",
                 recompute_layers: int = 0, sequence_parallel: bool = False, virtual_pipeline: int = 1,
                 micro_batches: Optional[int] = None) -> dict:
    """Bytes per GPU of the training step (weights, grads, optimizer, activations, total) and the
    peak of each phase (`phases`: train, save, load, and with `old_shape` the growth into this
    shape at this layout; training/phase_memory.py)."""
    local = params_per_gpu(mcfg, shape, vocab_padded, tp, pp)
    w, _ = bytes_per_param(precision)
    opt_bytes = optimizer_bytes(precision, dp, distributed_optimizer)
    acts = activation_bytes(mcfg, shape, vocab_padded, tp, pp, micro_batch, recompute, recompute_layers,
                            sequence_parallel=sequence_parallel and tp > 1,
                            virtual_pipeline=virtual_pipeline if pp > 1 else 1, micro_batches=micro_batches)
    out = {"params_per_gpu": local, "weights": w * local, "grads": 4 * local, "optimizer": opt_bytes * local,
           "activations": acts}
    out["total"] = sum(out[k] for k in ("weights", "grads", "optimizer", "activations"))
    old = params_per_gpu(mcfg, old_shape, vocab_padded, tp, pp) if old_shape is not None else None
    out["phases"] = phase_peaks(precision, dp, distributed_optimizer, local,
                                largest_tensor(mcfg, shape, vocab_padded, tp), old, acts)
    if old_shape is not None and growth == "msg-grow":  # streamed, not the in-process growth
        out["phases"]["grow"] = msg_grow_peak(mcfg, old_shape, shape, vocab_padded, tp, pp)
    return out
