"""Masked norms (eq. 16-19) against plain norms and a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from msg_megatron.ops import backend, masked_layer_norm, masked_rms_norm


def ref_layer_norm(x, m, w, b, eps):
    x, m, w, b = (t.double() for t in (x, m, w, b))
    mu = (x * m).sum(-1, keepdim=True) / m.sum()
    var = ((x - mu) ** 2 * m).sum(-1, keepdim=True) / m.sum()
    return ((x - mu) / torch.sqrt(var + eps) * w + b) * m


def ref_rms_norm(x, m, w, eps):
    x, m, w = (t.double() for t in (x, m, w))
    return x / torch.sqrt((x * x * m).sum(-1, keepdim=True) / m.sum() + eps) * w * m


def test_backend_named():
    assert backend() in ("torch", "cpu-ext", "cuda")


@pytest.mark.parametrize("d_old,d_new", [(1, 3), (7, 16), (64, 96), (1000, 1024)])
def test_zero_mask_equals_plain_norm_on_slice(d_old, d_new):
    torch.manual_seed(0)
    x = torch.randn(3, 5, d_new)
    x[..., d_old:] = 0  # new residual features are exactly 0 (paper eq. 13)
    w, b = torch.randn(d_new), torch.randn(d_new)
    m = torch.cat([torch.ones(d_old), torch.zeros(d_new - d_old)])
    y = masked_layer_norm(x, m, w, b, 1e-5)
    ref = F.layer_norm(x[..., :d_old], (d_old,), w[:d_old], b[:d_old], 1e-5)
    torch.testing.assert_close(y[..., :d_old], ref, rtol=1e-5, atol=1e-6)
    assert torch.all(y[..., d_old:] == 0)
    y = masked_rms_norm(x, m, w, 1e-5)
    ref = x[..., :d_old] * torch.rsqrt((x[..., :d_old] ** 2).mean(-1, keepdim=True) + 1e-5) * w[:d_old]
    torch.testing.assert_close(y[..., :d_old], ref, rtol=1e-5, atol=1e-6)
    assert torch.all(y[..., d_old:] == 0)


@pytest.mark.parametrize("d", [1, 5, 128, 777])
def test_fractional_masks_match_float64(d):
    torch.manual_seed(d)
    x, w, b = torch.randn(4, d) * 3, torch.randn(d), torch.randn(d)
    m = torch.rand(d)
    m[0] = 1.0  # at least one feature carries weight
    torch.testing.assert_close(masked_layer_norm(x, m, w, b, 1e-5).double(), ref_layer_norm(x, m, w, b, 1e-5),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked_rms_norm(x, m, w, 1e-5).double(), ref_rms_norm(x, m, w, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_all_ones_mask_is_the_ordinary_norm():
    x, w, b = torch.randn(2, 3, 33), torch.randn(33), torch.randn(33)
    torch.testing.assert_close(masked_layer_norm(x, torch.ones(33), w, b, 1e-5),
                               F.layer_norm(x, (33,), w, b, 1e-5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked_layer_norm(x, None, w, b, 1e-5), F.layer_norm(x, (33,), w, b, 1e-5))


def test_gradcheck_float64():
    torch.manual_seed(1)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([1, 1, 0.5, 0.25, 0, 1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_layer_norm(x, m, w, b, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: masked_rms_norm(x, m, w, 1e-5), (x, w))


def test_bf16_input_keeps_fp32_statistics():
    """bf16 in, bf16 out, statistics in fp32: the output is the exact norm of the bf16 input rounded
    once to bf16 (<= 0.5 ulp, plus fp32's own error: 0.6). Statistics taken in bf16 miss that by
    hundreds of ulps (computed here: the check can fail)."""
    from conftest import ulps

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 256, generator=gen) * 3 + 1).bfloat16()
    m = torch.cat([torch.ones(200), torch.zeros(56)])
    w, b = torch.randn(256, generator=gen), torch.randn(256, generator=gen)
    y = masked_layer_norm(x, m, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    want = ref_layer_norm(x, m, w, b, 1e-5)
    assert ulps(y, want, torch.bfloat16).max() <= 0.6
    mb = m.bfloat16()
    mu = (x * mb).sum(-1, keepdim=True) / mb.sum()
    var = ((x - mu) ** 2 * mb).sum(-1, keepdim=True) / mb.sum()
    in_bf16 = ((x - mu) / torch.sqrt(var + 1e-5) * w.bfloat16() + b.bfloat16()) * mb
    assert ulps(in_bf16, want, torch.bfloat16).max() > 10


def test_an_unbuilt_kernel_is_said_once_at_first_use_with_the_fix(monkeypatch):
    import warnings

    import torch

    from msg_megatron.ops import masked_norm as mn

    monkeypatch.setattr(mn, "_HAS_CPU_EXT", False)
    monkeypatch.setattr(mn, "_EXT_ERROR", "not built (reinstall with: pip install --no-build-isolation -e .)")
    monkeypatch.setattr(mn, "_WARNED", False)
    x, w, b = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    mask = torch.ones(8)
    with pytest.warns(RuntimeWarning, match=r"not built .* Fix: install torch first, then `pip install "
                                            r"--no-build-isolation -e \.`"):
        y = mn.masked_layer_norm(x, mask, w, b, 1e-5)
    torch.testing.assert_close(y, mn.masked_layer_norm_torch(x, mask, w, b, 1e-5), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        mn.masked_layer_norm(x, mask, w, b, 1e-5)
