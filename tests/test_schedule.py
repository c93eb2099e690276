import math

from msg_megatron.training.schedule import LRSchedule


def test_warmup_then_cosine_to_min():
    s = LRSchedule(1.0, 0.1, warmup_steps=10, decay_steps=110, style="cosine")
    assert math.isclose(s(0), 0.1) and math.isclose(s(9), 1.0)
    assert math.isclose(s(10), 1.0) and math.isclose(s(60), 0.55) and math.isclose(s(110), 0.1)
    assert math.isclose(s(500), 0.1)


def test_reset_to_peak_at_growth_stages():
    s = LRSchedule(1.0, 0.0, warmup_steps=0, decay_steps=100, style="linear", reset_steps=[50])
    assert math.isclose(s(49), 0.51)
    assert math.isclose(s(50), 1.0) and math.isclose(s(75), 0.5) and math.isclose(s(100), 0.0)
