"""train.precision=bf16: bf16 parameters with fp32 master weights (megatron's --bf16), on CPU (and
on the GPU where one is present: tools/gpu_session.sh runs this file).

- Growth grows the fp32 masters, not their bf16 rounding: after a growth the new masters' old
  entries equal the old masters bitwise, and the bf16 parameters equal the masters rounded.
- Function preservation at every growth inside the training loop (bf16 forward: 1e-3 relative,
  about a quarter of one bf16 ulp of the loss).
- Checkpoints hold the fp32 masters: resume is bitwise (CPU, same layout); a bf16 checkpoint loads
  into an fp32 run as its masters bitwise (not their bf16 rounding), and an fp32 checkpoint into a
  bf16 run as its masters bitwise, its parameters their rounding.
- Against an fp32 run of the same config the per-step losses stay within 2e-2 relative (bf16
  activations; the reference is the plain fp32 run).
"""
import pytest
import torch

from conftest import tiny_model_cfg
from msg_megatron.config import ParallelConfig, Shape, TrainConfig
from msg_megatron.growth.axes import GrowthPlan
from msg_megatron.growth.operators import grow_model
from msg_megatron.growth.optimizer_state import grow_optimizer
from msg_megatron.model import build_model, update_masks
from msg_megatron.parallel import device
from msg_megatron.optim.optimizer import build_optimizer, cast_keeping_masters
from test_train import read_metrics, tiny_cfg

TOKENS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0)).to(device())


def _step(opt):
    opt.ddp(TOKENS, TOKENS).mean().backward()
    opt.finish_grad_sync()
    opt.step(1e-3)
    opt.zero_grad()


def test_growth_grows_the_fp32_masters():
    tcfg = TrainConfig(precision="bf16")
    old = Shape(32, 64, 4, 2)
    model = build_model(tiny_model_cfg(), old)
    opt = build_optimizer(model, tcfg, masters=cast_keeping_masters(model, torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and opt.bf16
    for _ in range(3):
        _step(opt)
    name = "layers.1.mlp.linear_fc1.weight"
    p_old = dict(model.named_parameters())[name]
    master_old = opt.master_of(p_old).clone()
    assert not torch.equal(master_old, p_old.float())  # the masters carry more than the bf16 weights
    assert torch.equal(master_old.to(torch.bfloat16), p_old)
    opt.release_for_growth()
    assert all(b.grad_data.untyped_storage().size() == 0 for b in opt.ddp.buffers)  # freed for the grown model
    new_shape = Shape(48, 96, 6, 3)
    grown, name_map = grow_model(model, new_shape, step=3)
    new_opt = grow_optimizer(opt, model, grown, name_map, GrowthPlan(model, new_shape), tcfg, ParallelConfig())
    assert all(p.dtype == torch.bfloat16 for p in grown.parameters())
    p_new = dict(grown.named_parameters())[name]
    master_new = new_opt.master_of(p_new)
    assert torch.equal(master_new[:64, :32], master_old)  # exact fp32 values carried over
    assert torch.equal(master_new.to(torch.bfloat16), p_new)
    update_masks(grown, 3, 4)
    _step(new_opt)  # trains on


def _loaded(tmp_path, precision, ck):
    """A trainer of TINY at `precision` that loaded the checkpoint `ck` (no step taken): its
    parameters and, in bf16, the fp32 masters its optimizer holds, by name."""
    from msg_megatron.training.trainer import Trainer

    t = Trainer(tiny_cfg(tmp_path / precision, f"train.precision={precision}", f"checkpoint.load={ck}"))
    t.lock.release()
    params = dict(t.model.named_parameters())
    masters = {n: t.optimizer.master_of(p) for n, p in params.items()} if precision == "bf16" else None
    return params, masters


@pytest.mark.slow
def test_bf16_training_growth_resume_and_fp32_interchange(tmp_path, tiny_run):
    from msg_megatron.training.trainer import Trainer

    Trainer(tiny_cfg(tmp_path / "a", "train.precision=bf16", "train.save_interval=16")).run()
    recs = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    want = {r["step"]: r["loss"] for r in recs if "loss" in r}
    growths = [r for r in recs if r.get("event") == "growth"]
    assert [g["step"] for g in growths] == [12, 24]
    for g in growths:  # function preservation in bf16
        assert abs(g["probe_loss_after"] - g["probe_loss_before"]) <= 1e-3 * g["probe_loss_before"], g
    assert want[39] < want[0] - 1.0  # it learns

    # the checkpoint holds fp32 weights
    from msg_megatron.checkpoint.dist import tensor_index

    index = tensor_index(str(tmp_path / "a" / "ck" / "step_000016"))
    assert index["model.layers.0.mlp.linear_fc1.weight"].dtype == torch.float32

    # bitwise resume from step 16 (mid-ramp: the growth at step 12 ramps until step 18)
    ck = tmp_path / "a" / "ck" / "step_000016"
    Trainer(tiny_cfg(tmp_path / "b", "train.precision=bf16", f"checkpoint.load={ck}")).run()
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "loss" in r}
    assert sorted(got) == list(range(16, 40))
    for step in got:
        assert got[step] == want[step], (step, got[step], want[step])

    # an fp32 run of the same config (the session's tiny_run): losses close to the bf16 run's
    ref = {r["step"]: r["loss"] for r in read_metrics(tiny_run / "run" / "metrics.jsonl") if "loss" in r}
    for step in range(40):
        assert abs(ref[step] - want[step]) <= 2e-2 * ref[step], (step, ref[step], want[step])

    # bf16 checkpoint -> fp32 run: the weights are the fp32 masters bitwise (not their bf16 rounding,
    # which differs: checked), as the bf16 run that loads the same checkpoint holds them
    params32, _ = _loaded(tmp_path, "fp32", ck)
    params16, masters = _loaded(tmp_path, "bf16", ck)
    assert sorted(params32) == sorted(masters)
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters.values())
    for name, m in masters.items():
        assert params32[name].dtype == torch.float32 and torch.equal(params32[name], m), name
        assert torch.equal(params16[name], m.to(torch.bfloat16)), name

    # fp32 checkpoint -> bf16 run: its masters are the fp32 weights bitwise, its parameters their rounding
    fp32_ck = tiny_run / "ck" / "step_000016"
    params32, _ = _loaded(tmp_path / "back", "fp32", fp32_ck)
    params16, masters = _loaded(tmp_path / "back", "bf16", fp32_ck)
    for name, p in params32.items():
        assert torch.equal(masters[name], p), name
        assert params16[name].dtype == torch.bfloat16 and torch.equal(params16[name], p.to(torch.bfloat16)), name


def test_growing_bf16_parameters_without_their_masters_is_refused():
    tcfg = TrainConfig(precision="bf16")
    model = build_model(tiny_model_cfg(), Shape(32, 64, 4, 2))
    opt = build_optimizer(model, tcfg, masters=cast_keeping_masters(model, torch.bfloat16))
    new_shape = Shape(48, 96, 6, 2)
    grown, name_map = grow_model(model, new_shape, step=0)  # from the bf16 rounding: must not pass silently
    with pytest.raises(RuntimeError, match="release_for_growth"):
        grow_optimizer(opt, model, grown, name_map, GrowthPlan(model, new_shape), tcfg, ParallelConfig())
