"""The compiled CPU masked norms (csrc/masked_norm_cpu.cpp) against a float64 reference and the
pure-PyTorch fallback. Tolerances: float64 1e-10; float32 1e-5 relative / 1e-5 absolute
(statistics in float32, different summation order); bfloat16 and float16: 0.6 ulp of the float64
result (one rounding of the output; statistics in low precision would miss by hundreds).
"""
import pytest
import torch

from msg_megatron.ops import masked_norm as mn

pytestmark = pytest.mark.skipif(mn.backend("cpu") != "cpu-ext",
                                reason=f"CPU extension not built: {mn.extension_status()}")


def masks(d, gen):
    zero_one = (torch.rand(d, generator=gen) > 0.3).double()
    zero_one[0] = 1.0
    frac = torch.rand(d, generator=gen, dtype=torch.float64)
    frac[0] = 1.0
    return {"ones": torch.ones(d, dtype=torch.float64), "zero_one": zero_one, "fractional": frac}


def run(fn, x, m, w, b, rms):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if rms else b.detach().requires_grad_()
    y = fn(x, m, w, 1e-5) if rms else fn(x, m, w, b, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    return [y] + list(grads)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("d,lead", [(1, (5,)), (3, (2, 3)), (64, (4, 1, 2)), (1000, (3,)), (4097, (2,)),
                                    (16384, (2,))])
def test_extension_matches_float64_reference(rms, d, lead):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    w, b = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    ext = mn.masked_rms_norm if rms else mn.masked_layer_norm
    ref = mn.masked_rms_norm_torch if rms else mn.masked_layer_norm_torch
    for name, m in masks(d, gen).items():
        want = run(ref, x, m, w, b, rms)  # float64 reference
        got64 = run(ext, x, m, w, b, rms)
        for g, r in zip(got64, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda s: f"{name} f64: {s}")
        got32 = run(ext, x.float(), m.float(), w.float(), b.float(), rms)
        fb32 = run(ref, x.float(), m.float(), w.float(), b.float(), rms)  # the fallback agrees too
        for g, f, r in zip(got32, fb32, want):
            scale = r.abs().max().clamp_min(1.0)
            torch.testing.assert_close(g.double() / scale, r / scale, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g / scale, f / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rms", [False, True])
def test_gradcheck(rms):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([1, 1, 0.5, 0, 0.25, 1, 0, 1, 0.9], dtype=torch.float64)
    if rms:
        assert torch.autograd.gradcheck(lambda x, w: mn.masked_rms_norm(x, m, w, 1e-5), (x, w))
    else:
        assert torch.autograd.gradcheck(lambda x, w, b: mn.masked_layer_norm(x, m, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 256, generator=gen)
    m = torch.cat([torch.ones(200), torch.zeros(56)])
    w, b = torch.randn(256, generator=gen), torch.randn(256, generator=gen)
    from conftest import ulps

    y = mn.masked_layer_norm(x.to(dtype), m, w, b, 1e-5)
    assert y.dtype == dtype
    ref = mn.masked_layer_norm_torch(x.to(dtype).double(), m.double(), w.double(), b.double(), 1e-5)
    assert ulps(y, ref, dtype).max() <= 0.6


def test_bad_mask_shape_is_reported():
    with pytest.raises(RuntimeError, match="mask must have shape"):
        mn.masked_layer_norm(torch.randn(2, 8), torch.ones(7), torch.ones(8), torch.zeros(8), 1e-5)
