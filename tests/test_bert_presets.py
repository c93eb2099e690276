"""The paper's BERT presets (configs/bert_*.yaml) say what the paper says, literally.

Schedules against Tables 2 and 8 (stage steps and shapes [hidden, ffn, heads, layers], the run's
length), appendix D's settings (lr, warmup, linear decay, batch 256, sequence 128, LR reset at the
1st and 2nd growth, clip 1.0 for Bert-large only, 1M steps for the Full baselines), the masks'
phi = 5000 (section 3.2.1), and the models' sizes against the paper's 110M / 336M (within 1%:
BERT's pooler and NSP head, which we do not train, are 0.6M / 1.1M). msg-plan prices each.
"""
import pytest

from msg_megatron.config import Shape, load_config
from msg_megatron.plan import plan
from msg_megatron.training.sizes import count_params

K = 1000
TABLE = {  # preset: (final size, [(step, shape)], steps), transcribed from the paper
    "bert_base_sch1b": ("base", [(0, (512, 768, 8, 3)), (200 * K, (512, 3072, 8, 3)), (400 * K, (512, 3072, 8, 6)),
                                 (500 * K, (768, 3072, 8, 6)), (600 * K, (768, 3072, 12, 6)),
                                 (700 * K, (768, 3072, 12, 12))], 900 * K),
    "bert_large_sch1l": ("large", [(0, (768, 1024, 12, 6)), (200 * K, (768, 4096, 12, 6)), (400 * K, (768, 4096, 12, 12)),
                                   (500 * K, (1024, 4096, 12, 12)), (600 * K, (1024, 4096, 16, 12)),
                                   (700 * K, (1024, 4096, 16, 24))], 900 * K),
    "bert_large_rapid_l": ("large", [(0, (512, 1024, 8, 6)), (400 * K, (512, 4096, 8, 6)), (420 * K, (1024, 4096, 8, 6)),
                                     (440 * K, (1024, 4096, 16, 6)), (500 * K, (1024, 4096, 16, 24))], 800 * K),
    "bert_base_sch0": ("base", [(0, (768, 768, 12, 3)), (200 * K, (768, 768, 12, 6)), (400 * K, (768, 768, 12, 9)),
                                (600 * K, (768, 768, 12, 12)), (700 * K, (768, 3072, 12, 12))], 900 * K),
    "bert_large_sch0": ("large", [(0, (768, 1024, 16, 6)), (200 * K, (768, 4096, 16, 6)), (400 * K, (768, 4096, 16, 12)),
                                  (600 * K, (768, 4096, 16, 24))], 900 * K),
    "bert_base_full": ("base", [], 1000 * K),
    "bert_large_full": ("large", [], 1000 * K),
}
# Table 8 prints Sch0-L with hidden 768 in every stage (Bert-large's is 1024): kept as printed, said in the preset
SCH0_L_FINAL = Shape(768, 4096, 16, 24)
SIZE = {"base": (Shape(768, 3072, 12, 12), 1e-4, 10 * K, 0.0, 110e6),
        "large": (Shape(1024, 4096, 16, 24), 1e-5, 30 * K, 1.0, 336e6)}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_is_the_papers_schedule_and_settings(name):
    size, stages, steps = TABLE[name]
    final, lr, warmup, clip, params = SIZE[size]
    cfg = load_config(f"configs/{name}.yaml", [])
    m, t, g = cfg.model, cfg.train, cfg.growth
    assert m.family == "bert" and m.seq_length == 128 and m.activation == "gelu_erf" and m.head_dim == 64
    assert [(s.step, tuple(s.shape)) for s in g.stages] == stages
    assert t.steps == steps and t.global_batch_size == 256
    assert (t.lr, t.warmup_steps, t.decay_style, t.min_lr, t.clip_grad) == (lr, warmup, "linear", 0.0, clip)
    if stages:
        assert g.lr_reset_stages == [1, 2] and g.ramp_steps == 5000 and g.depth_init == "stack"
    schedule = cfg.schedule()
    if name == "bert_large_sch0":
        assert schedule[-1][1] == SCH0_L_FINAL
        return
    assert schedule[-1][1] == final  # every other schedule ends at its Full baseline's model
    vocab = -(-m.vocab_size // 128) * 128
    assert abs(count_params(m, final, vocab) - params) <= 0.01 * params


def test_msg_plan_prices_the_paper_schedules_below_their_full_baselines():
    """The schedules' FLOPs against their Full baselines (900k or 800k grown steps vs 1M at full size)."""
    def flops(name):
        return plan(load_config(f"configs/{name}.yaml", []), 0.5, "A100")["flops"]

    for grown, full in [("bert_base_sch1b", "bert_base_full"), ("bert_large_sch1l", "bert_large_full"),
                        ("bert_large_rapid_l", "bert_large_full"), ("bert_base_sch0", "bert_base_full"),
                        ("bert_large_sch0", "bert_large_full")]:
        assert flops(grown) < 0.8 * flops(full), grown
