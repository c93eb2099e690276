"""The configuration's sections and fields (each field's docstring is its documentation).

Field names follow megatron's where one exists. The `model` section is the *final* (target)
architecture; `growth.stages` is the schedule that reaches it, written as the paper's tuples
(hidden, ffn, heads, layers) so Table 2 / Table 10 can be copied literally.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional


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
    """`gpt` (decoder-only, pre-LN, causal) or `bert` (BERT's bidirectional post-LN encoder with
    token types and the masked-LM head; needs norm=layernorm, position_embedding=learned and
    tie_embeddings=true, as BERT has them)."""
    type_vocab_size: int = 2
    """BERT: token types (segments A and B)."""
    binary_head: bool = False
    """BERT: the sentence-order head (Megatron-LM's --bert-binary-head; ALBERT's SOP): a pooler,
    tanh(dense(h of [CLS])), and a 2-way classifier of whether segment B was swapped with A (half
    the samples are); its cross-entropy is added to the masked-LM loss. Off by default (the paper's
    BERT trains on MLM alone)."""
    vocab_size: int = 2048
    """Tokenizer vocabulary size (the embedding is padded to `make_vocab_size_divisible_by`)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this. Unlike megatron (a multiple of this x TP), the
    padding does not depend on the layout, so a checkpoint keeps its shapes under any TP degree;
    the padded size must divide by parallel.tensor (model/gpt.py: padded_vocab_size)."""
    hidden_size: int = 256
    """Final hidden size (the first element of the last stage's shape)."""
    ffn_hidden_size: int = 1024
    """Final FFN size."""
    num_attention_heads: int = 4
    """Final number of attention heads."""
    num_layers: int = 4
    """Final number of transformer layers."""
    num_query_groups: Optional[int] = None
    """Grouped-query attention (megatron's name): the final model's key/value heads, each shared by
    num_attention_heads / num_query_groups query heads. Default: one per head (multi-head
    attention). The query heads per group are fixed for the whole run: heads grow by whole groups
    (each stage's heads divide by the heads per group, its group count follows), a new group's
    output masked (eq. 23-24 per group). The group count cannot grow within a fixed head count:
    regrouping existing heads has no masked, function-preserving form, so it is not a growth."""
    kv_channels: Optional[int] = None
    """Head dimension, fixed while heads grow (paper appendix A). Default: hidden_size // num_attention_heads."""
    seq_length: int = 128
    """Training sequence length."""
    norm: str = "layernorm"
    """`layernorm` or `rmsnorm`."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    activation: str = "gelu"
    """`gelu` (tanh approximation, as GPT-2), `gelu_erf` (the exact erf GELU, as Google's BERT and
    megatron's default: what `msg-import-hf` gives a BERT with hidden_act=gelu) or `swiglu`."""
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

    @property
    def heads_per_group(self) -> int:
        """Query heads per key/value head (1: multi-head attention), fixed across stages."""
        return self.num_attention_heads // (self.num_query_groups or self.num_attention_heads)

    def groups(self, shape: "Shape") -> int:
        """Query groups (key/value heads) of a stage of `shape`."""
        return shape.heads // self.heads_per_group


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
    data: Any = None
    """The training blend from this stage on (data.paths' syntax; default: the previous stage's, else
    data.paths): each corpus continues where the earlier stages left it."""


@dataclass
class AutoGrowthConfig:
    """growth.schedule=auto (training/auto_growth.py): the run decides when to grow and to what. Every
    check_interval steps (once the last growth's masks are all 1) the run saves, trains its next
    probe_steps steps itself, saves again, and then grows candidates from the first checkpoint, cheapest
    first, with the same operators a fixed schedule uses, each trained those same steps on the same
    batches; the first whose pre-training rate (the paper's gamma, eq. 21, per unit of `cost`) beats the
    run's own over them by margin_sigma standard errors is kept (its steps become the run's, its growth a
    stage at the check's step), else the run goes on from its own."""

    check_interval: int = 100
    """Steps between checks (at every multiple, from the first one after the last growth's ramp)."""
    probe_steps: int = 50
    """Steps of a check's window: the run trains them, then each candidate probed; both rates are measured
    over them (about growth.ramp_steps: a growth's payoff shows once its masks have ramped)."""
    window: int = 100
    """Steps of the run's own training loss (its latest, since its last growth) its rate is fit over: its
    running estimate, logged as gamma +- gamma_se, and the baseline at each decision (>= probe_steps)."""
    combine: int = 1
    """How many dimensions one growth may grow together (1: one at a time, the paper's schedules)."""
    factor: float = 0.0
    """Each grown dimension is multiplied by this (capped at the model section); 0: grown to its final size."""
    shapes: List[List[int]] = field(default_factory=list)
    """Instead of combine/factor: the shapes a growth may go to ([hidden, ffn, heads, layers] each); a
    check tries those not smaller than the current shape in any dimension."""
    max_stages: int = 4
    """The most growths the run makes."""
    margin_sigma: float = 2.0
    """A candidate is grown into only when its rate beats the run's by this many standard errors of the
    difference (the step-to-step noise of the paired losses over the window; 2: ~2.3% false growths)."""
    max_probe_share: float = 0.1
    """The most the checks may cost, as a share of the run's model FLOPs (probes included): each probe runs
    only when it (probe_steps at the candidate's FLOPs per step) together with what the earlier checks cost
    (the probes that lost, the windows kept probes replaced) stays within this share of the run's FLOPs if
    it never grew after it; a check starts only when its cheapest probe fits. Counted in FLOPs so that
    every rank and every rerun probes the same; 1 probes every candidate at every check_interval."""
    cost: str = "flops"
    """The rate's denominator: `flops` (model FLOPs per step: the same decisions in every rerun and on any
    machine) or `time` (measured seconds per step: what this machine delivers; not reproducible)."""


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
    allow_ramp_change: bool = False
    """Resume with a growth.ramp_steps that sets the masks of already grown units to other values than
    the checkpoint's (the function changes at the resume step; logged). Refused without it."""
    stages: List[StageConfig] = field(default_factory=list)
    """The schedule; empty trains a fixed-size model. The first stage is at step 0, the last is the model shape
    (growth.schedule=auto: the stages so far; the run appends the ones it decides)."""
    schedule: str = "fixed"
    """`fixed`: growth.stages is the whole schedule. `auto`: the run starts from growth.stages and decides the
    later stages itself (growth.auto), up to the model section's shape."""
    auto: AutoGrowthConfig = field(default_factory=AutoGrowthConfig)


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel degree: heads, FFN units and the vocabulary are split over this many ranks."""
    pipeline: int = 1
    """Pipeline-parallel degree: layers are split into this many consecutive stages (1F1B schedule)."""
    virtual_pipeline: int = 1
    """Interleaved (virtual) pipeline: each pipeline rank holds this many chunks of layers
    (megatron's virtual_pipeline_model_parallel_size; 1: no interleaving). The layers are split into
    pipeline x virtual_pipeline chunks in megatron's order (chunk c of rank r holds virtual stage
    c x pipeline + r) and run under megatron's interleaved 1F1B schedule, whose bubble is 1/V of
    1F1B's for V x the point-to-point traffic. Needs parallel.pipeline > 1, every stage's layers
    divisible by pipeline x virtual_pipeline, and the micro-batches per data-parallel rank a
    multiple of pipeline. Checkpoints keep global layer numbers: they resume with or without it."""
    distributed_optimizer: bool = False
    """megatron's distributed optimizer: each data-parallel rank keeps AdamW state for 1/DP of the
    parameters (gradients reduce-scattered, parameters all-gathered); checkpoints are the same."""
    sequence_parallel: bool = False
    """megatron's sequence parallelism (ModelParallelConfig.sequence_parallel): between the TP
    regions (norms, residual adds, masks) activations are split along the sequence over the TP
    ranks, gathered before the column-parallel linears and reduce-scattered after the row-parallel
    ones (tensor_parallel.mappings), so that part of the activation memory is divided by TP. The
    norm weights' gradients are summed over TP. Needs parallel.tensor > 1 at every stage and a
    sequence length that divides by it. Same function and gradients, up to summation order."""
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
    recompute: str = "none"
    """Activation recomputation (megatron's recompute_granularity, through its
    `tensor_parallel.checkpoint`): `none`; `selective` (core attention: softmax(QK^T)V is recomputed
    in the backward, its s x s probabilities never stored; no saving under flash attention, which
    stores none); `full` (whole layers: a recomputed layer keeps only its input). Same gradients,
    bitwise, in fp32."""
    recompute_num_layers: int = 0
    """With recompute=full: recompute the first N layers of each pipeline stage (megatron's
    recompute_method=block), the rest keep their activations; 0 = every layer. Capped at the
    stage's layers, so one value serves every growth stage."""
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
    allow_lr_schedule_change: bool = False
    """Resume with a learning-rate schedule (lr, min_lr, warmup, decay, train.steps when decay_steps is
    unset, growth.lr_reset_stages) that gives another rate from the resume step on than the
    checkpoint's (Megatron-LM's --override-opt_param-scheduler; logged). Refused without it."""
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
    eval_tasks: List[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the model where it is (its layout, masks as they are) at
    train.eval_tasks_interval, at the end of each growth ramp and at the end (e.g. [msg_offline]: the
    shipped offline tasks; needs the `eval` extra). Scores go to metrics.jsonl and wandb as
    `tasks/<task>/<metric>`. GPT only."""
    eval_tasks_interval: int = 0
    """Run train.eval_tasks every N steps (0: only at ramp ends and at the end)."""
    eval_tasks_steps: List[int] = field(default_factory=list)
    """Also run train.eval_tasks after these steps (e.g. where a baseline's FLOPs equal another run's)."""
    eval_tasks_limit: float = 0
    """Documents per task for train.eval_tasks (0: all; < 1: that share)."""
    eval_tasks_at_ramp_end: bool = True
    """Also run train.eval_tasks where each growth ramp ends (the grown model at full strength)."""
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
    """The embedded corpus: a tokenizer to use instead of training one (a sentencepiece .model or a
    tokenizer.json; its vocabulary must be model.vocab_size). For data.paths, see data.tokenizer."""
    paths: Any = None
    """Prepared corpora as Megatron-LM's --data-path: one prefix (`/data/en_text_document`, its .bin and
    .idx), `[0.7, /data/en_text_document, 0.3, /data/zh_text_document]`, or `[{weight, prefix}, ...]`
    (data/blends.py). Set, it replaces `corpus`; samples come from megatron's GPTDataset, blended by
    its BlendedDataset (data/gpt_data.py)."""
    split: str = "969,30,1"
    """Megatron-LM's train,valid,test split of each corpus in `paths`, by documents."""
    valid_paths: Any = None
    """A separate validation blend (same syntax): `paths` then trains on all of its documents."""
    tokenizer: str = ""
    """The tokenizer `paths` were prepared with: a sentencepiece .model or a Hugging Face
    tokenizer.json (its EOD/BOS/PAD from the tokenizer_config.json beside it, else by name). Its
    vocabulary must be model.vocab_size; checkpoints and HF exports carry it."""
    index_cache: str = ""
    """Where megatron's dataset indices are cached (default: cache_dir/index-cache). Global rank 0
    builds them and every rank memory-maps them, so on a cluster it must be a path every node sees."""
    mask_prob: float = 0.15
    """BERT: the share of tokens chosen for the masked-LM loss (80% of them replaced by [MASK], 10% by
    a random token, 10% kept; Megatron-LM's --mask-prob)."""
    short_seq_prob: float = 0.1
    """BERT: the share of samples cut to a random shorter length (Megatron-LM's --short-seq-prob)."""
    whole_word_masking: bool = False
    """BERT: choose whole words (a piece and the `##` pieces after it) rather than single pieces."""
    allow_blend_change: bool = False
    """Resume even though the data (paths, split, valid_paths, a stage's data, seq_length, seed) differs
    from the checkpoint's: the sample order from the resumed step on is then the new data's (logged)."""


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
