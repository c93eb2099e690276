"""Checks of a configuration before any compute: each names the field and the fix."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .blend_syntax import parse_blend, parse_split
from .candidates import auto_candidates, first_check, reachable_shapes
from .schema import Config, ConfigError, Shape, StageConfig


def growth_refusal(old: Shape, new: Shape, init: str, depth_init: str, tp: int, pp: int) -> Optional[str]:
    """Why a growth old -> new at TP x PP cannot run, or None. One rule for the config check,
    grow_model and msg-grow: growth only adds units; a copied unit (init=copy) may live on another
    TP rank; under PP new layers other than interpolated copies would move between stages."""
    for dim, a, b in zip(("hidden", "ffn", "heads", "layers"), old.as_tuple(), new.as_tuple()):
        if b < a:
            return (f"the shape {old} -> {new} shrinks {dim} from {a} to {b}; growth only adds units: make "
                    "every dimension >= the previous stage's")
    if init == "copy" and tp > 1:
        return (f"growth.init=copy with parallel.tensor={tp}: a copied unit may live on another tensor-parallel "
                "rank; grow with parallel.tensor=1, or use growth.init=normal or zeros")
    if pp > 1 and new.layers != old.layers and depth_init != "interpolate":
        return (f"growth.depth_init={depth_init} with parallel.pipeline={pp}: new layers would have to move "
                "between pipeline stages; use growth.depth_init=interpolate (each copy sits above its source, "
                "on the same stage)")
    return None


def _choice(value, options, where):
    if value not in options:
        raise ConfigError(f"config field `{where}` is {value!r}; choose one of {', '.join(options)}.")


def _positive(value, where):
    if value is None or value <= 0:
        raise ConfigError(f"config field `{where}` must be positive, got {value!r}.")


# Every numeric field's range, checked in one place (`_validate_ranges`): (section.field, lowest,
# whether the lowest is allowed, highest or None, what the field is for). Every float must also be
# finite; None (an optional field left unset) passes.
RANGES = [
    ("model.norm_epsilon", 0, False, None, "the norms' epsilon (e.g. 1e-5)"),
    ("model.init_method_std", 0, False, None, "the std of the initial weights (e.g. 0.02)"),
    ("model.rotary_base", 0, False, None, "RoPE's base (e.g. 10000)"),
    ("growth.init_std", 0, True, None, "the std of new weights (e.g. 0.02; 0 with growth.init=zeros)"),
    ("growth.ramp_steps", 0, True, None, "the steps over which masks ramp in"),
    ("train.lr", 0, False, None, "the peak learning rate (e.g. 1e-3)"),
    ("train.min_lr", 0, True, None, "the final learning rate (e.g. 1e-4)"),
    ("train.warmup_steps", 0, True, None, "the warmup steps"),
    ("train.decay_steps", 0, False, None, "the step at which the decay ends (unset: train.steps)"),
    ("train.weight_decay", 0, True, None, "AdamW's weight decay (e.g. 0.01)"),
    ("train.adam_beta1", 0, True, 1, "AdamW's beta1 in [0, 1) (e.g. 0.9)"),
    ("train.adam_beta2", 0, True, 1, "AdamW's beta2 in [0, 1) (e.g. 0.95)"),
    ("train.adam_eps", 0, False, None, "AdamW's epsilon (e.g. 1e-8)"),
    ("train.clip_grad", 0, True, None, "the gradient-norm clip (0 disables it)"),
    ("train.seed", 0, True, None, "the seed"),
    ("train.eval_interval", 0, True, None, "steps between evaluations (0: only at the end)"),
    ("train.eval_iters", 0, True, None, "validation batches per evaluation"),
    ("train.eval_tasks_interval", 0, True, None, "steps between task evaluations (0: ramp ends and the end)"),
    ("train.eval_tasks_limit", 0, True, None, "documents per task (0: all; < 1: a share)"),
    ("train.save_interval", 0, True, None, "steps between saves (0: only at the end)"),
    ("train.threads", 0, True, None, "torch's CPU threads (0: torch's default)"),
    ("train.recompute_num_layers", 0, True, None, "layers per stage recomputed under recompute=full (0: all)"),
    ("data.corpus_mb", 0, False, None, "megabytes of embedded text"),
    ("data.mask_prob", 0, False, 1, "the share of tokens the masked-LM loss is on (e.g. 0.15)"),
    ("data.short_seq_prob", 0, True, 1, "the share of shortened masked-LM samples (e.g. 0.1)"),
    ("checkpoint.keep", 1, True, None, "how many checkpoints to keep (at least 1: the newest)"),
    ("parallel.gpus", 0, True, None, "the GPUs msg-plan plans for (0: tensor x pipeline)"),
]


def _validate_ranges(cfg: Config) -> None:
    for path, low, low_ok, high, what in RANGES:
        section, name = path.split(".")
        v = getattr(getattr(cfg, section), name)
        if v is None or isinstance(v, bool):
            continue
        bad = isinstance(v, float) and not math.isfinite(v)
        bad = bad or v < low or (v == low and not low_ok) or (high is not None and v >= high)
        if bad:
            need = (f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high is not None else "")
                    + (", finite" if isinstance(v, float) else ""))
            raise ConfigError(f"config field `{path}` is {v!r}; it must be {need}: {what}.")


def check_bert(m) -> None:
    """model.family=bert needs BERT's LayerNorm, learned positions and tied decoder (the config
    check, and MaskedGPT for a ModelConfig built directly)."""
    if m.family == "bert" and (m.norm, m.position_embedding, m.tie_embeddings) != ("layernorm", "learned", True):
        raise ConfigError("model.family=bert is BERT's encoder: set model.norm=layernorm, "
                          "model.position_embedding=learned and model.tie_embeddings=true (the MLM decoder is the "
                          f"word embedding); got {m.norm}, {m.position_embedding}, tie_embeddings={m.tie_embeddings}")
    if m.binary_head and m.family != "bert":
        raise ConfigError("model.binary_head is BERT's sentence-order head; set model.family=bert or "
                          "model.binary_head=false")


def validate(cfg: Config) -> None:
    """Reject bad configs before any compute, naming the field and the fix."""
    m, g, t, p = cfg.model, cfg.growth, cfg.train, cfg.parallel
    _validate_ranges(cfg)
    _choice(m.family, ["gpt", "bert"], "model.family")
    check_bert(m)
    if m.family == "bert" and cfg.data.corpus == "synthetic" and not cfg.data.paths:
        raise ConfigError("model.family=bert trains on sentence pairs from a corpus of sentences; data.corpus=synthetic "
                          "is GPT's (random tokens have none); use data.corpus=embedded, a directory "
                          "`msg-preprocess --sentences --output` wrote, or data.paths (`--sentences --output-prefix`)")
    _choice(m.norm, ["layernorm", "rmsnorm"], "model.norm")
    _choice(m.activation, ["gelu", "gelu_erf", "swiglu"], "model.activation")
    _choice(m.position_embedding, ["learned", "rope"], "model.position_embedding")
    _choice(g.operator, ["msg", "nomask", "net2net"], "growth.operator")
    _choice(g.schedule, ["fixed", "auto"], "growth.schedule")
    if g.schedule == "auto" and not g.stages:
        raise ConfigError("growth.schedule=auto starts from growth.stages[0]: give the first shape, e.g. "
                          "growth.stages=[{step: 0, shape: [hidden, ffn, heads, layers]}] (the model section is the "
                          "final shape)")
    if g.schedule == "auto" and any(st.tensor or st.pipeline for st in g.stages):
        raise ConfigError("growth.schedule=auto runs every stage at the job's layout (parallel.tensor/pipeline); "
                          "remove growth.stages[].tensor/pipeline (changing the layout between stages is a fixed "
                          "schedule's, through msg-grow)")
    _choice(g.init, ["normal", "zeros", "copy"], "growth.init")
    _choice(g.depth_init, ["interpolate", "stack", "random"], "growth.depth_init")
    _choice(t.decay_style, ["cosine", "linear", "constant"], "train.decay_style")
    _choice(t.precision, ["fp32", "bf16", "bf16-autocast"], "train.precision")
    _choice(t.fusion, ["auto", "eager", "compile"], "train.fusion")
    _choice(t.recompute, ["none", "selective", "full"], "train.recompute")
    if t.recompute_num_layers and t.recompute != "full":
        raise ConfigError(f"train.recompute_num_layers={t.recompute_num_layers} needs train.recompute=full "
                          f"(it is {t.recompute}); set train.recompute=full or remove recompute_num_layers.")
    _choice(cfg.checkpoint.verify, ["size", "full"], "checkpoint.verify")
    _positive(cfg.checkpoint.writers, "checkpoint.writers")
    if cfg.checkpoint.load == "auto" and not cfg.checkpoint.save:
        raise ConfigError("checkpoint.load=auto resumes from checkpoint.save, which is empty; set checkpoint.save.")
    _choice(cfg.logging.wandb, ["auto", "offline", "online", "disabled"], "logging.wandb")
    for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers",
                 "seq_length", "make_vocab_size_divisible_by"):
        _positive(getattr(m, name), f"model.{name}")
    if m.num_query_groups is not None:
        _positive(m.num_query_groups, "model.num_query_groups")
        if m.num_attention_heads % m.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={m.num_attention_heads} is not a multiple of model.num_query_groups="
                f"{m.num_query_groups}; each key/value head serves the same number of query heads.")
    if m.kv_channels is not None:
        _positive(m.kv_channels, "model.kv_channels")
    elif m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; set model.kv_channels (the fixed head dim) explicitly.")
    if m.position_embedding == "rope" and m.head_dim % 2:
        raise ConfigError(f"model.kv_channels={m.head_dim} must be even for rope; set an even head dim.")
    for name in ("steps", "global_batch_size", "micro_batch_size", "log_interval"):
        _positive(getattr(t, name), f"train.{name}")
    if t.eval_tasks and m.family == "bert":
        raise ConfigError(f"train.eval_tasks={t.eval_tasks} with model.family=bert: lm-eval's tasks score "
                          "left-to-right next-token prediction, which a masked-LM encoder does not do; remove train.eval_tasks (its "
                          "masked-LM validation loss is reported)")
    if t.eval_tasks and cfg.data.corpus == "synthetic":
        raise ConfigError("train.eval_tasks needs a tokenizer to turn the tasks' text into tokens; data.corpus="
                          "synthetic has none: use the embedded corpus or data.paths, or remove train.eval_tasks")
    if any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in t.eval_tasks_steps):
        raise ConfigError(f"train.eval_tasks_steps={t.eval_tasks_steps}: give step numbers >= 1 (after that many steps)")
    if any(not isinstance(x, str) or not x.strip() for x in t.eval_tasks):
        raise ConfigError(f"train.eval_tasks={t.eval_tasks}: give task names, e.g. [msg_offline]")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size}; make it one (it is accumulated in micro-batches).")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"train.lr={t.lr}, train.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0.")
    if t.warmup_steps < 0:
        raise ConfigError("train.warmup_steps must be >= 0.")
    if g.ramp_steps < 0:
        raise ConfigError("growth.ramp_steps (the paper's phi) must be >= 0.")
    if g.init_std < 0:
        raise ConfigError("growth.init_std must be >= 0.")
    _positive(p.tensor, "parallel.tensor")
    _positive(p.pipeline, "parallel.pipeline")
    _positive(p.virtual_pipeline, "parallel.virtual_pipeline")
    if p.tensor > 1 and g.operator == "net2net":
        raise ConfigError(
            f"growth.operator=net2net with parallel.tensor={p.tensor}: a copied unit may live on another "
            "tensor-parallel rank; run the net2net baseline with parallel.tensor=1.")
    if g.operator == "net2net" and g.depth_init == "random":
        raise ConfigError("growth.operator=net2net copies layers; use growth.depth_init=interpolate (bert2BERT) "
                          "or stack.")
    # the layout-only part of the rule (init=copy under TP), whatever the stages: refused up front
    why = growth_refusal(m.shape, m.shape, g.init, g.depth_init, p.tensor, p.pipeline)
    if why:
        raise ConfigError(why + ".")
    if not 0 <= cfg.data.valid_fraction < 1:
        raise ConfigError("data.valid_fraction must be in [0, 1).")
    _validate_stages(cfg)
    _validate_layout(cfg)
    _validate_data(cfg)


def _validate_data(cfg: Config) -> None:
    """The blends' syntax and weights (the files are checked when a run starts, data/gpt_data.py)."""
    d = cfg.data
    try:
        paths = parse_blend(d.paths, "data.paths")
        parse_blend(d.valid_paths, "data.valid_paths")
        parse_split(d.split)
        staged = [i for i, st in enumerate(cfg.growth.stages) if parse_blend(st.data, f"growth.stages[{i}].data")]
    except ValueError as e:
        raise ConfigError(f"{e}.") from None
    if paths and d.corpus != "embedded":
        raise ConfigError(f"data.paths is set and data.corpus={d.corpus!r}: they are two sources of training data; "
                          "keep one (remove data.corpus, or data.paths)")
    if (d.valid_paths or staged) and not paths:
        what = "data.valid_paths" if d.valid_paths else f"growth.stages[{staged[0]}].data"
        raise ConfigError(f"{what} is set without data.paths: blends of prepared corpora need data.paths (and "
                          "data.tokenizer) for the training data")
    if d.tokenizer and not paths:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r} is the tokenizer of data.paths, which is not set; the "
                          "embedded corpus takes data.tokenizer_model, and a prepared directory carries its own")
    if paths and not d.tokenizer:
        raise ConfigError("data.paths needs data.tokenizer: the tokenizer the corpora were prepared with (its "
                          "vocabulary is checked against model.vocab_size, and exports and msg-eval use it)")


def _validate_layout(cfg: Config) -> None:
    """Every stage's heads and FFN units must split evenly over the tensor-parallel ranks (each rank
    appends its share of new units locally when they grow), and its layers over the pipeline stages
    (each stage at its own layout when it names one, else at parallel.*)."""
    sched = cfg.schedule()
    for i, (step, shape) in enumerate(sched):
        where = f"growth.stages[{i}]" if cfg.growth.stages else "model"
        tp, pp = cfg.layout(i)
        if cfg.growth.stages:
            st = cfg.growth.stages[i]
            for name in ("tensor", "pipeline", "global_batch_size"):
                if getattr(st, name) is not None and getattr(st, name) <= 0:
                    raise ConfigError(f"`{where}.{name}` must be positive, got {getattr(st, name)}.")
            gbs = cfg.batch_size(i)
            if gbs % cfg.train.micro_batch_size:
                raise ConfigError(f"`{where}` has a global batch size of {gbs}, not a multiple of "
                                  f"train.micro_batch_size={cfg.train.micro_batch_size}.")
        q = cfg.model.heads_per_group
        if shape.heads % q:
            raise ConfigError(
                f"`{where}` has heads={shape.heads}, not a multiple of the {q} query heads per group "
                f"(model.num_attention_heads={cfg.model.num_attention_heads} / model.num_query_groups="
                f"{cfg.model.num_query_groups}); heads grow by whole query groups: use a multiple of {q}.")
        if q > 1 and cfg.model.groups(shape) % tp:
            raise ConfigError(
                f"`{where}` has {cfg.model.groups(shape)} query groups ({shape.heads} heads / {q} per group), which "
                f"do not divide by parallel.tensor={tp}; each tensor-parallel rank holds whole groups: choose a "
                f"number of groups that is a multiple of {tp} for every stage, or another tensor-parallel degree.")
        for dim, n in (("heads", shape.heads), ("ffn", shape.ffn)):
            if n % tp:
                raise ConfigError(
                    f"`{where}` has {dim}={n}, which does not divide by parallel.tensor={tp}; choose a "
                    f"multiple of {tp} for every stage, or another tensor-parallel degree.")
        if cfg.parallel.sequence_parallel and tp <= 1:
            raise ConfigError(
                f"parallel.sequence_parallel=true, but `{where}` runs at parallel.tensor={tp}: sequence "
                "parallelism splits activations over the tensor-parallel ranks; use parallel.tensor >= 2 at "
                "every stage, or parallel.sequence_parallel=false.")
        if cfg.parallel.sequence_parallel and cfg.model.seq_length % tp:
            raise ConfigError(
                f"parallel.sequence_parallel=true splits each sequence over parallel.tensor={tp} ranks, but "
                f"model.seq_length={cfg.model.seq_length} does not divide by {tp} (`{where}`); choose a "
                f"sequence length that is a multiple of {tp}.")
        v = cfg.parallel.virtual_pipeline
        if v > 1 and pp <= 1:
            raise ConfigError(
                f"parallel.virtual_pipeline={v} interleaves pipeline stages, but `{where}` runs at "
                f"parallel.pipeline={pp}; use parallel.pipeline >= 2, or parallel.virtual_pipeline=1.")
        if v > 1 and shape.layers % (pp * v):
            raise ConfigError(
                f"`{where}` has layers={shape.layers}, which does not split into parallel.pipeline x "
                f"parallel.virtual_pipeline = {pp} x {v} = {pp * v} chunks of whole layers; choose a multiple of "
                f"{pp * v} layers for every stage, or another virtual_pipeline.")
        if v > 1 and cfg.batch_size(i) // cfg.train.micro_batch_size < pp:
            raise ConfigError(
                f"`{where}` has {cfg.batch_size(i) // cfg.train.micro_batch_size} micro-batches per step (global "
                f"batch {cfg.batch_size(i)} / micro-batch {cfg.train.micro_batch_size}); megatron's interleaved "
                f"schedule needs at least parallel.pipeline={pp} per data-parallel rank, in multiples of {pp}.")
        if shape.layers % pp:
            raise ConfigError(
                f"`{where}` has layers={shape.layers}, which does not split evenly over parallel.pipeline={pp} "
                f"stages; choose a multiple of {pp} for every stage (changing the pipeline degree between "
                "stages goes through a checkpoint: msg-grow).")
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    for i in range(1, len(sched)):
        why = growth_refusal(sched[i - 1][1], sched[i][1], cfg.growth.init, cfg.growth.depth_init, *cfg.layout(i))
        if why:
            raise ConfigError(f"`growth.stages[{i}]`: {why}.")
    mult = cfg.model.make_vocab_size_divisible_by
    padded = -(-cfg.model.vocab_size // mult) * mult
    tp = max([tp] + [cfg.layout(i)[0] for i in range(len(sched))])
    if padded % tp:
        raise ConfigError(
            f"the padded vocabulary ({padded} rows: model.vocab_size={cfg.model.vocab_size} rounded up to "
            f"model.make_vocab_size_divisible_by={mult}) does not divide by parallel.tensor={tp}; set "
            f"make_vocab_size_divisible_by to a multiple of {tp}.")


def _validate_stages(cfg: Config) -> None:
    m, g = cfg.model, cfg.growth
    if not g.stages:
        if g.lr_reset_stages:
            raise ConfigError("growth.lr_reset_stages is set but growth.stages is empty; remove it or add stages.")
        return
    prev_step, prev = None, None
    for i, st in enumerate(g.stages):
        where = f"growth.stages[{i}]"
        if len(st.shape) != 4:
            raise ConfigError(f"`{where}.shape` must be [hidden, ffn, heads, layers], got {st.shape}.")
        if any(v <= 0 for v in st.shape):
            raise ConfigError(f"`{where}.shape` {st.shape}: every size must be positive.")
        hidden, ffn, heads, layers = st.shape
        if st.kv_channels is not None and st.kv_channels != m.head_dim:
            raise ConfigError(
                f"`{where}.kv_channels`={st.kv_channels} differs from the model's head dim {m.head_dim}; MSG grows "
                "heads at a fixed head dim (paper appendix A). Remove it or set it to model.kv_channels.")
        if i == 0 and st.step != 0:
            raise ConfigError(f"`{where}.step` is {st.step}; the first stage is the initial shape and must be at step 0.")
        if prev_step is not None and st.step <= prev_step:
            raise ConfigError(
                f"`{where}.step`={st.step} is not after the previous stage's step {prev_step}; "
                "list stages in increasing step order.")
        if st.step >= cfg.train.steps and i > 0:
            raise ConfigError(
                f"`{where}.step`={st.step} is not before train.steps={cfg.train.steps}; the stage would never run.")
        if prev is not None:
            why = growth_refusal(Shape(*prev), Shape(*st.shape), g.init, "interpolate", 1, 1)
            if why:
                raise ConfigError(f"`{where}.shape`: {why}.")
            if list(prev) == list(st.shape):
                raise ConfigError(f"`{where}.shape` equals the previous stage's; remove the stage or grow something.")
        prev_step, prev = st.step, st.shape
    if g.schedule == "auto":
        _validate_auto(cfg)
        return
    if tuple(prev) != m.shape.as_tuple():
        raise ConfigError(
            f"the last stage's shape {list(prev)} differs from the model section {list(m.shape.as_tuple())}; "
            "the model section is the final shape, so make them equal.")
    for i in g.lr_reset_stages:
        if not 1 <= i < len(g.stages):
            raise ConfigError(f"growth.lr_reset_stages entry {i} is not a growth stage (1..{len(g.stages) - 1}).")


def _validate_auto(cfg: Config) -> None:
    """growth.schedule=auto: the stages so far lie within the model section, a check and its probe fit
    in train.steps, there is something to grow, and every shape the run could grow into runs at the
    job's layout (auto stages never change the layout: a checkpoint relayout is a fixed schedule's)."""
    m, g, a, t = cfg.model, cfg.growth, cfg.growth.auto, cfg.train
    final, last = m.shape, Shape(*g.stages[-1].shape)
    where = f"growth.stages[{len(g.stages) - 1}].shape"
    if any(x > f for x, f in zip(last.as_tuple(), final.as_tuple())):
        raise ConfigError(f"`{where}` {list(last.as_tuple())} is larger than the model section "
                          f"{list(final.as_tuple())} in some dimension; growth.schedule=auto grows toward the model "
                          "section (the final shape): make every stage fit within it.")
    for name in ("check_interval", "probe_steps", "window", "combine", "max_stages"):
        _positive(getattr(a, name), f"growth.auto.{name}")
    first = first_check(cfg)
    if first + a.probe_steps >= t.steps:
        raise ConfigError(
            f"growth.auto.probe_steps={a.probe_steps}: the first check (step {first}, growth.auto.check_interval="
            f"{a.check_interval}) and its probe would end at step {first + a.probe_steps}, not before "
            f"train.steps={t.steps}, so no check could decide; lower growth.auto.probe_steps or check_interval, "
            "or raise train.steps.")
    if a.probe_steps < 3:
        raise ConfigError(f"growth.auto.probe_steps={a.probe_steps}: a rate and its standard error need at least 3 "
                          "steps; use more (e.g. 50)")
    if a.window < a.probe_steps:
        raise ConfigError(f"growth.auto.window={a.window} is shorter than growth.auto.probe_steps={a.probe_steps}: "
                          "the run's rate is fit over at least the probe's steps; raise window")
    if a.factor and (not math.isfinite(a.factor) or a.factor <= 1):
        raise ConfigError(f"growth.auto.factor={a.factor}: grow by a factor > 1, or 0 to grow each dimension to "
                          "the model section's size")
    if not math.isfinite(a.margin_sigma) or a.margin_sigma < 0:
        raise ConfigError(f"growth.auto.margin_sigma={a.margin_sigma}: give a finite number of standard errors "
                          ">= 0 (e.g. 2)")
    _choice(a.cost, ["flops", "time"], "growth.auto.cost")
    for i, sh in enumerate(a.shapes):
        w = f"growth.auto.shapes[{i}]"
        if len(sh) != 4 or any(v <= 0 for v in sh):
            raise ConfigError(f"`{w}` {sh}: give [hidden, ffn, heads, layers], every size positive.")
        if any(x > f for x, f in zip(sh, final.as_tuple())):
            raise ConfigError(f"`{w}` {sh} is beyond the model section {list(final.as_tuple())} in some dimension; "
                              "candidates grow toward the model section: shrink it or enlarge the model section.")
    if not auto_candidates(a, last, final):
        raise ConfigError(
            f"growth.schedule=auto has no candidate to grow into from `{where}` {list(last.as_tuple())}: it "
            + ("is the model section's shape already" if last == final else "is not below any of growth.auto.shapes")
            + "; start from a smaller shape, or train with growth.schedule=fixed.")
    if not (math.isfinite(a.max_probe_share) and 0 < a.max_probe_share <= 1):
        raise ConfigError(f"growth.auto.max_probe_share={a.max_probe_share}: give the probes' most share of the "
                          "run's FLOPs, in (0, 1] (e.g. 0.1; 1 checks at every check_interval)")
    if not cfg.checkpoint.save:
        raise ConfigError("growth.schedule=auto returns from each probe by loading the checkpoint it saves at the "
                          "check; set checkpoint.save.")
    for i in g.lr_reset_stages:
        if not 1 <= i < len(g.stages) + a.max_stages:
            raise ConfigError(f"growth.lr_reset_stages entry {i} is not a growth stage (1..{len(g.stages) - 1} "
                              f"given, up to growth.auto.max_stages={a.max_stages} more decided).")
    try:
        shapes = reachable_shapes(a, last, final)
    except ValueError as e:
        raise ConfigError(f"growth.auto: {e}") from None
    for shape in shapes:  # the layout rules of a fixed stage at that shape, named as the auto candidate it is
        probe = dataclasses.replace(cfg, growth=dataclasses.replace(
            g, schedule="fixed", stages=list(g.stages) + [StageConfig(step=t.steps - 1, shape=list(shape.as_tuple()))]))
        try:
            _validate_layout(probe)
        except ConfigError as e:
            raise ConfigError(
                f"growth.schedule=auto could grow into {list(shape.as_tuple())}, which cannot run at this job's "
                f"layout: {e} Auto stages run at the job's layout (parallel.*); restrict the candidates "
                "(growth.auto.shapes, combine, factor), or change the model section or the layout.") from None
