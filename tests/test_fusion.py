"""The compiled elementwise fusions (msg_megatron/ops/fused.py) against the eager ops, and torch's
fused AdamW against its default implementation.

Tolerances: fp32 outputs and gradients of the compiled functions within 1e-5 relative of eager
(inductor reorders and fuses fp32 arithmetic; observed ~1e-7); a whole grown, mid-ramp model's
per-token losses and gradients within 1e-5; bf16 cross-entropy (megatron's fused kernel) within
1e-2 of the fp32 reference on the same bf16 logits, the bound of bf16 rounding of the gradient.
"""
import pytest
import torch

from conftest import rel_err, tiny_model_cfg
from msg_megatron.config import ConfigError, Shape, load_config
from msg_megatron.growth.operators import grow_model
from msg_megatron.model import build_model, update_masks
from msg_megatron.ops import fused
from msg_megatron.parallel import device

# the GPU where there is one (tools/gpu_session.sh runs this file there): inductor's GPU kernels and
# CUDA's fused AdamW are then what is compared
DEV = device()


@pytest.fixture
def compile_mode():
    fused.configure("compile")
    yield
    fused.configure("eager")


def _run(fn, *args):
    """fn's outputs and the gradients of the float inputs that require them, for a fixed cotangent."""
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def _compare(name, *make_args):
    for args_fn in make_args:
        fused.configure("eager")
        ref = _run(getattr(fused, name), *args_fn())
        fused.configure("compile")
        try:
            got = _run(getattr(fused, name), *args_fn())
        finally:
            fused.configure("eager")
        for r, g in zip(ref, got):
            assert r.shape == g.shape and rel_err(r, g) <= 1e-5, name


def test_compiled_functions_match_eager_including_a_regrown_shape():
    def rope_args(s, h):
        gen = torch.Generator().manual_seed(s + h)
        qkv = torch.randn(s, 2, h, 3 * 16, generator=gen).to(DEV).requires_grad_()  # q, k: strided views
        q, k, _ = qkv.split(16, dim=-1)
        ang = torch.randn(s, 1, 1, 16, generator=gen).to(DEV)
        return q, k, ang.cos(), ang.sin()

    def act_args(d, mask_kind, gated):
        gen = torch.Generator().manual_seed(d)
        h = torch.randn(5, 3, 2 * d if gated else d, generator=gen).to(DEV).requires_grad_()
        mask = {"none": None, "ramp": torch.rand(d, generator=gen),
                "zeros": torch.cat([torch.ones(d - 3), torch.zeros(3)])}[mask_kind]
        return h, None if mask is None else mask.to(DEV)

    # the second shape (growth) makes torch.compile recompile: it must still be exact
    _compare("rope_qk", lambda: rope_args(12, 4), lambda: rope_args(12, 6))
    for gated, name in ((True, "swiglu_masked"), (False, "gelu_masked")):
        _compare(name, *[lambda d=d, k=k: act_args(d, k, gated) for d, k in ((8, "none"), (8, "ramp"), (12, "zeros"))])
    assert {f.__name__ for f in fused._compiled} == {"_rope_qk", "_swiglu_masked", "_gelu_masked"}


def test_grown_model_mid_ramp_same_losses_and_gradients_compiled(compile_mode):
    cfg = tiny_model_cfg(norm="rmsnorm", activation="swiglu", position_embedding="rope", tie_embeddings=False)
    fused.configure("eager")
    model, _ = grow_model(build_model(cfg, Shape(32, 64, 4, 2)), Shape(48, 96, 6, 3), step=0)
    update_masks(model, 5, 10)  # every mask half-way through its ramp
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEV)
    labels = torch.roll(tokens, -1, dims=1)

    def losses_and_grads(mode):
        fused.configure(mode)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, labels)
        loss.mean().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = losses_and_grads("eager")
    loss, grads = losses_and_grads("compile")
    assert rel_err(ref_loss, loss) <= 1e-5
    for n, g in ref_grads.items():
        assert rel_err(g, grads[n]) <= 1e-5, n


def test_bf16_cross_entropy_fused_matches_fp32_reference(compile_mode):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 3, 256, generator=gen) * 4).bfloat16().to(DEV)
    labels = torch.randint(0, 256, (16, 3), generator=gen).to(DEV)
    ref_in = logits.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_in.view(-1, 256), labels.view(-1), reduction="none").view(16, 3)
    ref.sum().backward()
    got_in = logits.clone().requires_grad_()
    got = fused.vocab_parallel_cross_entropy(got_in, labels)
    got.sum().backward()
    assert got.dtype == torch.float32
    assert rel_err(ref.detach(), got.detach()) <= 1e-5  # forward statistics are fp32 on bf16 inputs
    assert got_in.grad.dtype == torch.bfloat16 and rel_err(ref_in.grad, got_in.grad.float()) <= 1e-2


def test_fusion_modes_and_config_errors():
    assert fused.resolve("eager") == "eager" and fused.resolve("compile") == "compile"
    assert fused.resolve("auto") == ("compile" if torch.cuda.is_available() else "eager")
    with pytest.raises(ValueError, match="fusion mode"):
        fused.resolve("fast")
    with pytest.raises(ConfigError, match="train.fusion"):
        load_config("configs/demo_cpu.yaml", ["train.fusion=fast"])


def test_a_failing_compile_falls_back_under_auto_and_is_an_error_when_asked_for(monkeypatch):
    def broken_compile(fn, **kw):
        def run(*args):
            raise OSError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "_compiled", {})
    h = torch.randn(4, 6)
    try:
        fused.configure("compile")
        with pytest.raises(RuntimeError, match="train.fusion=eager"):
            fused.gelu_masked(h, None)
        monkeypatch.setattr(fused, "_requested", "auto")  # what `auto` resolves to on a GPU machine
        with pytest.warns(RuntimeWarning, match="running the eager ops"):
            out = fused.gelu_masked(h, None)
        assert torch.equal(out, torch.nn.functional.gelu(h, approximate="tanh")) and fused.mode() == "eager"
    finally:
        fused.configure("eager")


def test_fused_adamw_matches_the_default_and_keeps_its_state_through_set_state():
    """torch's fused AdamW (switched on for GPUs by TrainOptimizer; forced onto the CPU here)
    against the default implementation on the same gradients: parameters and moments within 1e-6
    relative after one step (a second step would compare different gradients: the key bias's
    gradient is pure rounding noise, which AdamW scales up to lr-sized steps); a fresh fused
    optimizer given the first one's state by set_state then continues bitwise like it."""
    from msg_megatron.config import TrainConfig
    from msg_megatron.optim.optimizer import MOMENTS, build_optimizer, use_fused_adamw

    cfg = tiny_model_cfg()
    tcfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEV)
    labels = torch.roll(tokens, -1, dims=1)
    on = (DEV.type,)

    def step(model, opt):
        opt.zero_grad()
        opt.ddp(tokens, labels).mean().backward()
        opt.finish_grad_sync()
        opt.step(1e-2)

    models, opts = [], []
    for fused_on in (False, True):
        model = build_model(cfg, Shape(32, 64, 4, 2), seed=5)
        opt = build_optimizer(model, tcfg)
        assert opt.fused_adamw == (DEV.type == "cuda")  # on by itself on GPUs only
        if not fused_on:  # the reference: torch's default implementation
            for group in [opt.adamw.defaults] + opt.adamw.param_groups:
                group["fused"], group["foreach"] = None, None
            assert not opt.fused_adamw
        elif not opt.fused_adamw:
            assert use_fused_adamw(opt.adamw, devices=on) and opt.fused_adamw
        step(model, opt)
        models.append(model)
        opts.append(opt)
    ref, fused_model = (dict(m.named_parameters()) for m in models)
    for n, p in ref.items():
        assert rel_err(p.detach(), fused_model[n].detach()) <= 1e-6, n
        a, b = opts[0].state_of(p), opts[1].state_of(fused_model[n])
        assert float(a["step"]) == float(b["step"]) == 1.0
        for k in MOMENTS:
            assert rel_err(a[k], b[k]) <= 1e-6, (n, k)
    assert all(g["fused"] for g in opts[1].adamw.param_groups)

    # a second fused optimizer on a copy of the model, given the state by set_state
    twin = build_model(cfg, Shape(32, 64, 4, 2), seed=5)
    twin.load_state_dict(models[1].state_dict())
    twin_opt = build_optimizer(twin, tcfg)
    assert twin_opt.fused_adamw or use_fused_adamw(twin_opt.adamw, devices=on)
    for (n, p), q in zip(models[1].named_parameters(), twin.parameters()):
        st = opts[1].state_of(p)
        twin_opt.set_state(q, {"step": st["step"], **{k: st[k].clone() for k in MOMENTS}})
    for _ in range(2):
        step(models[1], opts[1])
        step(twin, twin_opt)
    for (n, p), q in zip(models[1].named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    assert use_fused_adamw(opts[0].adamw, devices=on) is False  # not after its first step
