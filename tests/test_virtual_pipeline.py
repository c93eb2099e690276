"""Interleaved (virtual) pipeline, parallel.virtual_pipeline: the layer order, the depth growth
per chunk and the refusals. The training equivalence (TP2 x PP2 x V2 with sequence parallelism,
layers doubled by a growth, losses within 1e-5 of one process) and the resumes across V are
tests/test_parallel.py's `tp2pp2_vpp2_sp`, `tp2pp2_vpp2_sp_to_tp1pp1` and `pp2_to_pp2_vpp2`; the
bubble and activation counts are checked against the schedule itself in tests/test_plan.py."""
import pytest
from conftest import assert_refused

from msg_megatron.config import ConfigError, load_config
from msg_megatron.growth.operators import chunk_depth_plan, plan_depth
from msg_megatron.model import gpt

LAYOUT = ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=8", "train.global_batch_size=8",
          "train.micro_batch_size=2"]


@pytest.mark.parametrize("pp, v, want", [
    (2, 2, [(0, 1, 4, 5), (2, 3, 6, 7)]),                   # megatron's order: chunk c of rank r = stage c*PP + r
    (2, 4, [(0, 2, 4, 6), (1, 3, 5, 7)]),
    (4, 2, [(0, 4), (1, 5), (2, 6), (3, 7)]),
    (2, 1, [(0, 1, 2, 3), (4, 5, 6, 7)]),
])
def test_each_rank_holds_megatrons_chunks(monkeypatch, pp, v, want):
    from msg_megatron.config import Shape

    monkeypatch.setattr(gpt, "virtual_size", lambda: v)
    for rank in range(pp):
        monkeypatch.setattr(gpt, "pp_rank_size", lambda r=rank: (r, pp))
        piece = gpt.stage_piece(Shape(32, 64, 2, 8))
        assert piece.layers == want[rank]
        assert (piece.pre_process, piece.post_process) == (rank == 0, rank == pp - 1)


def test_depth_growth_keeps_each_new_layer_in_its_sources_chunk():
    """8 -> 16 layers at PP=2, V=2: per chunk, interpolation puts each copy above its source, in
    the source's chunk on the source's rank, and the result is the single-process plan."""
    pp, v, old, new = 2, 2, 8, 16
    whole = plan_depth(old, new, "interpolate")
    for rank in range(pp):
        old_layers = [g for c in range(v) for g in range((c * pp + rank) * 2, (c * pp + rank + 1) * 2)]
        new_layers = [g for c in range(v) for g in range((c * pp + rank) * 4, (c * pp + rank + 1) * 4)]
        local = chunk_depth_plan(len(old_layers), len(new_layers), v, "interpolate")
        for j, src in enumerate(local):
            assert src // 2 == j // 4  # the same chunk of this rank
            assert old_layers[src] == whole[new_layers[j]]


def test_depth_growth_other_than_interpolate_is_refused_under_interleaving():
    with pytest.raises(ValueError, match="depth_init=stack under an interleaved pipeline"):
        chunk_depth_plan(4, 8, 2, "stack")


@pytest.mark.parametrize("overrides, words", [
    (["parallel.pipeline=1", "parallel.virtual_pipeline=2"], ["parallel.virtual_pipeline=2", "parallel.pipeline=1"]),
    (LAYOUT + ["model.num_layers=6"], ["layers=6", "2 x 2 = 4", "multiple of 4"]),
    (LAYOUT + ["train.global_batch_size=2"], ["1 micro-batches", "parallel.pipeline=2"]),
    (["parallel.virtual_pipeline=0"], ["parallel.virtual_pipeline", "positive"]),
])
def test_bad_virtual_pipeline_settings_are_refused(overrides, words):
    assert_refused(overrides, words)


def test_micro_batches_per_rank_must_fill_the_interleaved_groups():
    """6 micro-batches over DP=2 are 3 per rank, not a multiple of PP=2: refused before any compute."""
    from msg_megatron.training.run_setup import check_batch_split as _check_batch_split

    cfg = load_config(None, LAYOUT + ["train.global_batch_size=12"])
    _check_batch_split(cfg, (1, 2), 1)  # 6 per rank: fine
    with pytest.raises(ConfigError) as e:
        _check_batch_split(cfg, (1, 2), 2)
    for w in ("3 micro-batches of 2 per data-parallel rank (DP=2)", "parallel.pipeline=2", "= 8"):
        assert w in str(e.value), str(e.value)
