"""Typed run configuration: YAML in, `section.field=value` overrides, validation before any compute.

Field names follow megatron's where one exists. The `model` section is the *final* (target)
architecture; `growth.stages` is the schedule that reaches it, written as the paper's tuples
(hidden, ffn, heads, layers) so Table 2 / Table 10 can be copied literally.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and the fix."""


@dataclass(frozen=True)
class Shape:
    """One architecture point in the paper's order (section 2.2)."""

    hidden: int
    ffn: int
    heads: int
    layers: int

    def as_tuple(self):
        return (self.hidden, self.ffn, self.heads, self.layers)

    def __str__(self):
        return "({}, {}, {}, {})".format(*self.as_tuple())


@dataclass
class ModelConfig:
    family: str = "gpt"
    """Model family; only the decoder-only `gpt` exists so far."""
    vocab_size: int = 2048
    """Tokenizer vocabulary size (the embedding is padded to `make_vocab_size_divisible_by`)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this (times the TP degree), as megatron does."""
    hidden_size: int = 256
    """Final hidden size (the first element of the last stage's shape)."""
    ffn_hidden_size: int = 1024
    """Final FFN size."""
    num_attention_heads: int = 4
    """Final number of attention heads."""
    num_layers: int = 4
    """Final number of transformer layers."""
    kv_channels: Optional[int] = None
    """Head dimension, fixed while heads grow (paper appendix A). Default: hidden_size // num_attention_heads."""
    seq_length: int = 128
    """Training sequence length."""
    norm: str = "layernorm"
    """`layernorm` or `rmsnorm`."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    activation: str = "gelu"
    """`gelu` (tanh approximation, as GPT-2) or `swiglu`."""
    position_embedding: str = "learned"
    """`learned` absolute positions or `rope`."""
    rotary_base: int = 10000
    """RoPE base when position_embedding is rope."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer."""
    add_bias_linear: bool = True
    """Biases in the attention and MLP linear layers."""
    init_method_std: float = 0.02
    """Std of the normal init of a model built from scratch."""

    @property
    def shape(self) -> Shape:
        return Shape(self.hidden_size, self.ffn_hidden_size, self.num_attention_heads, self.num_layers)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class StageConfig:
    step: int = 0
    """Training step at which this stage's shape takes effect (growth happens before that step)."""
    shape: List[int] = field(default_factory=list)
    """[hidden, ffn, heads, layers] of this stage."""
    kv_channels: Optional[int] = None
    """Optional statement of the head dim; it must equal model.kv_channels (heads grow at fixed head dim)."""
    global_batch_size: Optional[int] = None
    """Sequences per step from this stage on (default: train.global_batch_size), e.g. FLM-101B's 2304 -> 2160."""
    tensor: Optional[int] = None
    """Tensor-parallel degree from this stage on (default: the previous stage's, else parallel.tensor). A run
    reaching a stage at another layout saves and exits with status 76; msg-grow --tensor/--pipeline grows and
    reshards the checkpoint, and the next job resumes at the new layout (launch/slurm/chain_stages.sh)."""
    pipeline: Optional[int] = None
    """Pipeline degree from this stage on (default: the previous stage's, else parallel.pipeline)."""


@dataclass
class GrowthConfig:
    operator: str = "msg"
    """`msg` (masked, strictly function-preserving), or the paper's baselines: `nomask` (the same new
    weights, masks removed right after growth: Table 4's No Mask) and `net2net` (bert2BERT: new
    units copy existing ones, outgoing weights split between copies, eq. 5-6; new layers are copies,
    no masks; appendix C)."""
    ramp_steps: int = 100
    """Steps over which new masks ramp linearly from 0 to 1 (the paper's phi, section 3.2.1)."""
    init: str = "normal"
    """New width weights: `normal` (N(0, init_std), paper 3.2.2), `zeros`, or `copy` (replicate existing units)."""
    init_std: float = 0.02
    """Std of the normal init of new weights."""
    depth_init: str = "interpolate"
    """New layers: `interpolate` (copy each layer above itself), `stack` (repeat the stack), `random`."""
    lr_reset_stages: List[int] = field(default_factory=list)
    """Stage indices (1 = first growth) at which the learning rate resets to its peak."""
    stages: List[StageConfig] = field(default_factory=list)
    """The schedule; empty trains a fixed-size model. The first stage is at step 0, the last is the model shape."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel degree: heads, FFN units and the vocabulary are split over this many ranks."""
    pipeline: int = 1
    """Pipeline-parallel degree: layers are split into this many consecutive stages (1F1B schedule)."""
    distributed_optimizer: bool = False
    """megatron's distributed optimizer: each data-parallel rank keeps AdamW state for 1/DP of the
    parameters (gradients reduce-scattered, parameters all-gathered); checkpoints are the same."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's data-parallel reduce during the backward of the last
    micro-batch, as soon as the bucket is complete (megatron's DDP), instead of after it."""
    gpus: int = 0
    """GPUs the schedule is planned for (msg-plan's data-parallel degree; 0: tensor x pipeline). The
    launcher decides the real world size."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Total optimizer steps."""
    precision: str = "fp32"
    """`fp32`; `bf16`: bf16 parameters and activations with fp32 master weights, gradient buffers,
    AdamW state, norm statistics and loss (megatron's --bf16; also on CPU); `bf16-autocast`: fp32
    parameters, matmuls under CUDA bf16 autocast (GPU only)."""
    fusion: str = "auto"
    """Elementwise fusions (RoPE, SwiGLU/GELU with the FFN mask, bf16 cross-entropy): `compile`
    (torch.compile/inductor kernels), `eager` (plain PyTorch ops) or `auto` (compile on GPUs, eager
    on CPU). Same function either way, up to rounding."""
    global_batch_size: int = 8
    """Sequences per optimizer step."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; global/micro micro-batches are accumulated."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    decay_style: str = "cosine"
    """`cosine`, `linear` or `constant` decay after warmup."""
    decay_steps: Optional[int] = None
    """Step at which the decay reaches min_lr (default: steps)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: int = 1234
    """Seed of the initial model, new growth weights and the data order."""
    log_interval: int = 1
    """Log every N steps. Losses and gradient norms stay on the device in between (no host sync per
    step): a non-finite loss is found, and with several processes a SIGTERM/SIGUSR1 agreed on, at
    these reads (and before each save), at most N steps late."""
    eval_interval: int = 50
    """Evaluate every N steps (0: only at the end)."""
    eval_iters: int = 4
    """Validation batches per evaluation."""
    save_interval: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    threads: int = 0
    """torch intra-op threads on CPU (0: torch's default)."""


@dataclass
class DataConfig:
    corpus: str = "embedded"
    """`embedded` (Python stdlib sources + pydoc topics, built locally), `synthetic` (uniformly random
    tokens: throughput benchmarks, like megatron's --mock-data) or a directory from msg-preprocess."""
    corpus_mb: float = 4.0
    """Megabytes of embedded text to use."""
    valid_fraction: float = 0.02
    """Share of documents held out for validation (embedded corpus)."""
    cache_dir: str = ""
    """Where prepared data is cached (default: $MSG_CACHE_DIR or ~/.cache/msg-megatron)."""
    tokenizer_model: str = ""
    """A sentencepiece model to use instead of training one (must match model.vocab_size)."""


@dataclass
class CheckpointConfig:
    save: str = ""
    """Directory to save checkpoints into (empty: no checkpoints)."""
    load: str = ""
    """Checkpoint to resume from: a step directory, a save dir (its `latest`), or `auto`: the newest
    complete checkpoint in `save` if there is one (an incomplete or corrupt newer one is skipped and
    reported), else start from scratch. The setting for jobs that may be preempted and requeued."""
    init_from: str = ""
    """Start a new run (step 0, fresh optimizer) from this checkpoint's weights, e.g. msg-import-hf's
    output: its shape must be growth.stages[0]'s and its architecture this config's. A checkpoint
    found by `load` (a resumed job) takes precedence."""
    keep: int = 3
    """How many step checkpoints to keep in `save`."""
    verify: str = "size"
    """Checks on load against the manifest: `size` (every file present with its size) or `full`
    (also each file's CRC-32: reads the whole checkpoint once more)."""
    writers: int = 4
    """Files each rank writes in parallel (megatron's writer processes; more hide fsync latency, 4
    measured best on a 2-core VM, see docs/benchmarks.md)."""


@dataclass
class LoggingConfig:
    wandb: str = "auto"
    """`offline`, `online`, `disabled`, or `auto` (online only when WANDB_API_KEY is set)."""
    project: str = "msg-megatron"
    """wandb project."""
    run_dir: str = "runs/default"
    """Directory for metrics.jsonl and wandb files."""
    name: str = ""
    """Run name (default: the config file's stem)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- derived views -------------------------------------------------------------------
    def schedule(self) -> List[tuple]:
        """[(step, Shape)] including the initial shape at step 0."""
        if not self.growth.stages:
            return [(0, self.model.shape)]
        return [(s.step, Shape(*s.shape)) for s in self.growth.stages]

    def batch_size(self, stage: int) -> int:
        """Global batch size (sequences per step) during stage `stage`."""
        for st in reversed(self.growth.stages[: stage + 1]):
            if st.global_batch_size:
                return st.global_batch_size
        return self.train.global_batch_size

    def layout(self, stage: int) -> tuple:
        """(tensor, pipeline) degrees stage `stage` runs at: the latest stage up to it that names
        them, else parallel.*."""
        before = list(reversed(self.growth.stages[: stage + 1]))
        tp = next((st.tensor for st in before if st.tensor), self.parallel.tensor)
        pp = next((st.pipeline for st in before if st.pipeline), self.parallel.pipeline)
        return tp, pp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- loading ---------------------------------------------------------------------------------
def _hint(name, options):
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean `{close[0]}`?" if close else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(value, tp, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field `{where}` must be a mapping, got {value!r}.")
        return _build(tp, value, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field `{where}` must be a list, got {value!r}.")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field `{where}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config field `{where}` must be an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field `{where}` must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config field `{where}` must be a string, got {value!r}.")
        return str(value)
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key `{path}`.{_hint(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def parse_override(text: str):
    """`a.b=value` -> (['a', 'b'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like `section.field=value` (e.g. train.steps=50).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override `{text}`: cannot parse value: {e}") from None
    return key.strip().split("."), value


def _list_index(node: list, part: str, path: List[str], i: int) -> int:
    """`part` as an index into the list at `path[:i]`, or a ConfigError naming the list's length."""
    where = ".".join(path[:i]) or "the config"
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"override `{'.'.join(path)}`: `{where}` is a list; `{part}` must be an index 0-{len(node) - 1}.")
    k = int(part)
    if not 0 <= k < len(node):
        raise ConfigError(f"override `{'.'.join(path)}`: `{where}` has {len(node)} entries (0-{len(node) - 1}); "
                          f"there is no entry {k}. Set the whole list instead ({where}=[...]).")
    return k


def _apply_override(data: dict, path: List[str], value):
    node = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path, i)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override `{'.'.join(path)}`: `{'.'.join(path[:i + 1])}` is not a section.")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, len(path) - 1)] = value
    else:
        node[last] = value


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Read YAML (optional), apply `section.field=value` overrides, validate."""
    data: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file `{path}` does not exist (the presets live in configs/).")
        if os.path.isdir(path):
            presets = sorted(f for f in os.listdir(path) if f.endswith((".yaml", ".yml")))
            raise ConfigError(f"config `{path}` is a directory; name a YAML file in it"
                              + (f" (e.g. {os.path.join(path, presets[0])})" if presets else "") + ".")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file `{path}` is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file `{path}` must hold a mapping of sections (model:, train:, ...).")
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _apply_override(data, keys, value)
    cfg = _build(Config, data)
    if path and not cfg.logging.name:
        cfg.logging.name = os.path.splitext(os.path.basename(path))[0]
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


# ---- validation ------------------------------------------------------------------------------
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
    ("train.save_interval", 0, True, None, "steps between saves (0: only at the end)"),
    ("train.threads", 0, True, None, "torch's CPU threads (0: torch's default)"),
    ("data.corpus_mb", 0, False, None, "megabytes of embedded text"),
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


def validate(cfg: Config) -> None:
    """Reject bad configs before any compute, naming the field and the fix."""
    m, g, t, p = cfg.model, cfg.growth, cfg.train, cfg.parallel
    _validate_ranges(cfg)
    _choice(m.family, ["gpt"], "model.family")
    _choice(m.norm, ["layernorm", "rmsnorm"], "model.norm")
    _choice(m.activation, ["gelu", "swiglu"], "model.activation")
    _choice(m.position_embedding, ["learned", "rope"], "model.position_embedding")
    _choice(g.operator, ["msg", "nomask", "net2net"], "growth.operator")
    _choice(g.init, ["normal", "zeros", "copy"], "growth.init")
    _choice(g.depth_init, ["interpolate", "stack", "random"], "growth.depth_init")
    _choice(t.decay_style, ["cosine", "linear", "constant"], "train.decay_style")
    _choice(t.precision, ["fp32", "bf16", "bf16-autocast"], "train.precision")
    _choice(t.fusion, ["auto", "eager", "compile"], "train.fusion")
    _choice(cfg.checkpoint.verify, ["size", "full"], "checkpoint.verify")
    _positive(cfg.checkpoint.writers, "checkpoint.writers")
    if cfg.checkpoint.load == "auto" and not cfg.checkpoint.save:
        raise ConfigError("checkpoint.load=auto resumes from checkpoint.save, which is empty; set checkpoint.save.")
    _choice(cfg.logging.wandb, ["auto", "offline", "online", "disabled"], "logging.wandb")
    for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers",
                 "seq_length", "make_vocab_size_divisible_by"):
        _positive(getattr(m, name), f"model.{name}")
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
    if p.tensor > 1 and g.operator == "net2net":
        raise ConfigError(
            f"growth.operator=net2net with parallel.tensor={p.tensor}: a copied unit may live on another "
            "tensor-parallel rank; run the net2net baseline with parallel.tensor=1.")
    if g.operator == "net2net" and g.depth_init == "random":
        raise ConfigError("growth.operator=net2net copies layers; use growth.depth_init=interpolate (bert2BERT) "
                          "or stack.")
    if p.tensor > 1 and g.init == "copy":
        raise ConfigError(
            f"growth.init=copy with parallel.tensor={p.tensor}: a copied unit may live on another tensor-"
            "parallel rank; grow with parallel.tensor=1, or use growth.init=normal or zeros.")
    if not 0 <= cfg.data.valid_fraction < 1:
        raise ConfigError("data.valid_fraction must be in [0, 1).")
    _validate_stages(cfg)
    _validate_layout(cfg)


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
        for dim, n in (("heads", shape.heads), ("ffn", shape.ffn)):
            if n % tp:
                raise ConfigError(
                    f"`{where}` has {dim}={n}, which does not divide by parallel.tensor={tp}; choose a "
                    f"multiple of {tp} for every stage, or another tensor-parallel degree.")
        if shape.layers % pp:
            raise ConfigError(
                f"`{where}` has layers={shape.layers}, which does not split evenly over parallel.pipeline={pp} "
                f"stages; choose a multiple of {pp} for every stage (changing the pipeline degree between "
                "stages goes through a checkpoint: msg-grow).")
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    grows_depth = any(b[1].layers != a[1].layers for a, b in zip(sched, sched[1:]))
    if pp > 1 and grows_depth and cfg.growth.depth_init != "interpolate":
        raise ConfigError(
            f"growth.depth_init={cfg.growth.depth_init} with parallel.pipeline={pp}: new layers would have to "
            "move between pipeline stages; use growth.depth_init=interpolate (each copy sits above its source, "
            "on the same stage).")
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
            names = ["hidden", "ffn", "heads", "layers"]
            for n, a, b in zip(names, prev, st.shape):
                if b < a:
                    raise ConfigError(
                        f"`{where}.shape` shrinks {n} from {a} to {b}; growth only adds units. "
                        "Make every dimension >= the previous stage's.")
            if list(prev) == list(st.shape):
                raise ConfigError(f"`{where}.shape` equals the previous stage's; remove the stage or grow something.")
        prev_step, prev = st.step, st.shape
    if tuple(prev) != m.shape.as_tuple():
        raise ConfigError(
            f"the last stage's shape {list(prev)} differs from the model section {list(m.shape.as_tuple())}; "
            "the model section is the final shape, so make them equal.")
    for i in g.lr_reset_stages:
        if not 1 <= i < len(g.stages):
            raise ConfigError(f"growth.lr_reset_stages entry {i} is not a growth stage (1..{len(g.stages) - 1}).")
