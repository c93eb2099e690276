import pytest

from msg_megatron.config import ConfigError, load_config

SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.num_layers=2",
         "train.steps=20"]


def stages(*items):
    return "growth.stages=[" + ", ".join("{step: %d, shape: %s}" % (s, list(sh)) for s, sh in items) + "]"


def test_demo_config_loads_and_overrides(tmp_path):
    cfg = load_config("configs/demo_cpu.yaml", ["train.steps=500", "model.norm=rmsnorm", "growth.ramp_steps=7"])
    assert cfg.train.steps == 500 and cfg.model.norm == "rmsnorm" and cfg.growth.ramp_steps == 7
    assert cfg.schedule()[0][1].as_tuple() == (128, 256, 4, 2)
    assert cfg.logging.name == "demo_cpu"


@pytest.mark.parametrize("preset", ["demo_cpu", "gpt2_full", "gpt2_sch1g", "gpt2_sch_new"])
def test_presets_validate(preset):
    cfg = load_config(f"configs/{preset}.yaml")
    assert cfg.schedule()[-1][1] == cfg.model.shape


@pytest.mark.parametrize("overrides, words", [
    (["model.hidn_size=3"], ["unknown config key", "model.hidn_size", "hidden_size"]),
    (["train.steps=abc"], ["train.steps", "integer"]),
    (["model.norm=batchnorm"], ["model.norm", "layernorm, rmsnorm"]),
    ([stages((0, (64, 128, 4, 2)), (5, (32, 128, 4, 2)))], ["shrinks hidden", "stages[1]"]),
    ([stages((0, (32, 64, 2, 1)), (10, (48, 96, 3, 1)), (5, (64, 128, 4, 2)))], ["stages[2].step", "increasing"]),
    ([stages((3, (64, 128, 4, 2)))], ["stages[0].step", "step 0"]),
    ([stages((0, (0, 128, 4, 2)), (5, (64, 128, 4, 2)))], ["positive"]),
    ([stages((0, (32, 64, 2, 1)), (5, (64, 128, 4, 2))), "model.kv_channels=16",
      "growth.stages.1.kv_channels=8"], ["kv_channels", "fixed head dim"]),
    ([stages((0, (32, 64, 2, 1)), (5, (64, 128, 8, 2)))], ["last stage", "model section"]),
    ([stages((0, (32, 64, 2, 1)), (50, (64, 128, 4, 2)))], ["train.steps"]),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], ["global_batch_size", "multiple"]),
    (["parallel.pipeline=3"], ["layers=2", "parallel.pipeline=3"]),
    ([stages((0, (32, 64, 2, 2)), (5, (64, 128, 4, 4))), "model.num_layers=4", "parallel.pipeline=2",
      "growth.depth_init=stack"],
     ["depth_init=stack", "interpolate"]),
    (["parallel.tensor=3"], ["heads=4", "parallel.tensor=3"]),  # bad layout: names the numbers
    ([stages((0, (32, 64, 2, 1)), (5, (64, 128, 4, 2))), "parallel.tensor=4"], ["stages[0]", "heads=2", "parallel.tensor=4"]),
    (["parallel.tensor=2", "growth.init=copy"], ["growth.init=copy", "parallel.tensor=2"]),
    (["parallel.tensor=0"], ["parallel.tensor", "positive"]),
    (["checkpoint.writers=0"], ["checkpoint.writers", "positive"]),
    (["train.precision=fp16"], ["train.precision", "fp32, bf16, bf16-autocast"]),
    (["parallel.tensor=3", "model.num_attention_heads=3", "model.ffn_hidden_size=130", "model.kv_channels=16"],
     ["ffn=130", "parallel.tensor=3"]),
    (["parallel.tensor=3", "model.num_attention_heads=3", "model.ffn_hidden_size=96", "model.kv_channels=16"],
     ["padded vocabulary", "make_vocab_size_divisible_by"]),
    (["train.steps"], ["section.field=value"]),
    (["train.eval_tasks=[msg_zen]", "model.family=bert", "model.position_embedding=learned"],
     ["train.eval_tasks", "model.family=bert", "masked-LM"]),
    (["train.eval_tasks=[msg_zen]", "data.corpus=synthetic"], ["train.eval_tasks", "synthetic", "tokenizer"]),
    (["train.eval_tasks=['']"], ["train.eval_tasks", "task names"]),
    (["train.eval_tasks_interval=-1"], ["train.eval_tasks_interval"]),
])
def test_bad_configs_fail_clearly(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, SMALL + overrides)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_config_directory_and_list_index_past_the_end_are_named():
    """A config path that is a directory, and an override indexing past a list's end (or with a
    non-number), are one-line ConfigErrors naming the fix, not IsADirectoryError / IndexError."""
    with pytest.raises(ConfigError, match=r"config `configs` is a directory; name a YAML file in it \(e.g. configs/"):
        load_config("configs")
    with pytest.raises(ConfigError, match=r"`growth.stages` has 5 entries \(0-4\); there is no entry 5. Set the whole"):
        load_config("configs/demo_cpu.yaml", ["growth.stages.5.step=3"])
    with pytest.raises(ConfigError, match=r"`growth.stages` is a list; `x` must be an index 0-4"):
        load_config("configs/demo_cpu.yaml", ["growth.stages.x.step=3"])
    with pytest.raises(ConfigError, match="there is no entry -1"):
        load_config("configs/demo_cpu.yaml", ["growth.stages.-1.step=3"])
    assert load_config("configs/demo_cpu.yaml", ["growth.stages.1.step=100"]).growth.stages[1].step == 100


@pytest.mark.parametrize("override, need", [
    ("train.lr=inf", "> 0, finite"), ("train.lr=nan", "> 0, finite"), ("train.min_lr=nan", ">= 0, finite"),
    ("growth.init_std=nan", ">= 0, finite"), ("model.norm_epsilon=-1", "> 0"), ("train.adam_eps=0", "> 0"),
    ("model.init_method_std=-1", "> 0"), ("train.threads=-1", ">= 0"), ("train.decay_steps=-5", "> 0"),
    ("checkpoint.keep=0", ">= 1"), ("checkpoint.keep=-2", ">= 1"), ("train.adam_beta2=1.0", "< 1"),
    ("train.clip_grad=-1", ">= 0"), ("data.corpus_mb=0", "> 0"), ("train.weight_decay=inf", ">= 0, finite"),
])
def test_every_numeric_field_out_of_range_is_refused_at_load_naming_it(override, need):
    """Values that used to pass validation and fail mid-run (or, keep <= 0, silently keep every
    checkpoint): each is refused when the config is loaded, naming the field, its value and the range."""
    field = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, SMALL + [override])
    msg = str(e.value)
    assert f"config field `{field}` is" in msg and "it must be" in msg and need in msg, msg
