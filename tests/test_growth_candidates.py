"""The next-stage shapes a schedule search tries (config/candidates.py), against lists written out by hand."""
import pytest

from conftest import run_cli
from msg_megatron.config import Shape
from msg_megatron.config.candidates import next_shapes


def test_one_dimension_at_a_time_and_combinations():
    cur, fin = Shape(64, 128, 2, 1), Shape(96, 256, 2, 2)  # heads already final
    assert next_shapes(cur, fin) == [Shape(96, 128, 2, 1), Shape(64, 256, 2, 1), Shape(64, 128, 2, 2)]
    assert next_shapes(cur, fin, combine=2) == next_shapes(cur, fin) + [
        Shape(96, 256, 2, 1), Shape(96, 128, 2, 2), Shape(64, 256, 2, 2)]
    assert next_shapes(cur, fin, combine=3)[-1] == fin and len(next_shapes(cur, fin, combine=4)) == 7
    assert next_shapes(fin, fin, combine=2) == []
    with pytest.raises(ValueError, match="larger than the final shape"):
        next_shapes(Shape(128, 128, 2, 1), fin)
    with pytest.raises(ValueError, match="combine=0"):
        next_shapes(cur, fin, combine=0)


def test_combine_is_refused_without_schedule(tmp_path):
    r = run_cli(["msg_megatron.gridsearch", "configs/demo_cpu.yaml", "--candidates", "64,128,2,1", "--combine", "2"])
    assert r.returncode == 2 and "--combine 2" in r.stderr and "with --schedule" in r.stderr, r.stderr[-600:]


def test_growth_by_a_factor_and_listed_shapes():
    """growth.auto.factor grows each dimension x factor capped at the final size; growth.auto.shapes offers the
    listed shapes that only add to the current one; reachable_shapes is every shape a run could get to."""
    from types import SimpleNamespace

    from msg_megatron.config.candidates import auto_candidates, reachable_shapes

    cur, fin = Shape(64, 128, 2, 1), Shape(96, 512, 2, 4)
    assert next_shapes(cur, fin, factor=2) == [Shape(96, 128, 2, 1), Shape(64, 256, 2, 1), Shape(64, 128, 2, 2)]
    with pytest.raises(ValueError, match="factor=1"):
        next_shapes(cur, fin, factor=1)
    auto = SimpleNamespace(shapes=[[64, 256, 2, 1], [32, 512, 2, 4], [96, 512, 2, 4]], combine=1, factor=0.0)
    assert auto_candidates(auto, cur, fin) == [Shape(64, 256, 2, 1), Shape(96, 512, 2, 4)]  # (32 < 64: not a growth)
    assert reachable_shapes(auto, cur, fin) == [Shape(64, 256, 2, 1), Shape(96, 512, 2, 4)]
    by2 = SimpleNamespace(shapes=[], combine=1, factor=2.0)
    reach = reachable_shapes(by2, cur, fin)
    assert Shape(96, 512, 2, 4) in reach and Shape(64, 256, 2, 4) in reach and len(reach) == 2 * 3 * 3 - 1
