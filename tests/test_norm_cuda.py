"""CUDA masked norms: compiled by nvcc here; run against a float64 reference on a GPU.

Tolerances: fp32 1e-5, fp16 5e-3, bf16 3e-2 (relative to the output's scale), dw/db fp32 1e-4.
"""
import glob
import os
import shutil
import subprocess

import pytest
import torch

from conftest import REPO
from msg_megatron.ops import masked_norm as mn


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(REPO, "csrc", "*.cu"))))
def test_cuda_sources_compile(source, tmp_path):
    r = subprocess.run(["nvcc", "-std=c++17", "-O3", "-gencode", "arch=compute_80,code=sm_80",
                        "-gencode", "arch=compute_90,code=sm_90", "-c", source, "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


gpu = pytest.mark.skipif(not torch.cuda.is_available() or mn.backend("cuda") != "cuda",
                         reason="no CUDA GPU, or the CUDA extension is not built (needs a CUDA build of torch)")


@gpu
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("d", [1, 7, 1024, 4099, 16384])
def test_cuda_matches_float64_reference(rms, dtype, tol, d):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(37, d, generator=gen)
    w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    m = torch.rand(d, generator=gen)
    m[0] = 1.0
    dy = torch.randn(37, d, generator=gen)
    xq = x.to(dtype)  # the reference sees the same quantised input

    def grads(xx, mm, ww, bb, dyy, fn):
        xx, ww = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        bb = None if rms else bb.clone().requires_grad_()
        y = fn(xx, mm, ww, 1e-5) if rms else fn(xx, mm, ww, bb, 1e-5)
        gs = torch.autograd.grad(y, [t for t in (xx, ww, bb) if t is not None], dyy.to(y.dtype))
        return [y] + list(gs)

    ref = grads(xq.double(), m.double(), w.double(), b.double(), dy.double(),
                mn.masked_rms_norm_torch if rms else mn.masked_layer_norm_torch)
    got = grads(xq.cuda(), m.cuda(), w.cuda(), b.cuda(), dy.cuda(), mn.masked_rms_norm if rms else mn.masked_layer_norm)
    for g, r in zip(got, ref):
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.double().cpu() / scale, r / scale, rtol=tol, atol=tol)
