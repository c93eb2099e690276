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
    # one architecture (sm_80: A100/A800, the lowest the kernels target): what is checked is that the
    # sources compile; a second -gencode doubled the time of the slowest unit of the suite's CPU work
    r = subprocess.run(["nvcc", "-std=c++17", "-O3", "-gencode", "arch=compute_80,code=sm_80",
                        "-c", source, "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


gpu = pytest.mark.skipif(not torch.cuda.is_available() or mn.backend("cuda") != "cuda",
                         reason="no CUDA GPU, or the CUDA extension is not built (needs a CUDA build of torch)")


@gpu
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows,d,offset", [
    (37, 1, 0), (37, 7, 0), (37, 1024, 0), (37, 4099, 0), (37, 16384, 0),  # generic + register paths
    (3001, 1024, 0),   # many rows per block: dw/db accumulate across rows in shared memory
    (64, 12288, 0), (16, 32768, 0),  # widest register layouts (fp32 32768 takes the generic path)
    (45, 1024, 1),     # x misaligned by one element: generic path for an even width
])
def test_cuda_matches_float64_reference(rms, dtype, tol, rows, d, offset):
    _check_against_float64(rms, dtype, tol, rows, d, offset)


@gpu
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows,d", [(37, 8), (37, 256), (3001, 1024), (1000, 2048), (5, 2048), (999, 520)])
def test_cuda_warp_per_row_kernels_match_float64_reference(rms, dtype, tol, rows, d, monkeypatch):
    """The opt-in warp-per-row path (MSG_NORM_WARP_ROWS=1, rows of <= 256 packs of 16 bytes); widths
    it cannot take (fp32 2048) fall back to the block path and must still be right."""
    monkeypatch.setenv("MSG_NORM_WARP_ROWS", "1")
    _check_against_float64(rms, dtype, tol, rows, d, 0)


def _check_against_float64(rms, dtype, tol, rows, d, offset):
    gen = torch.Generator().manual_seed(d + rows)
    x = torch.randn(rows * d + offset, generator=gen)[offset:].view(rows, d)
    w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    m = torch.rand(d, generator=gen)
    m[0] = 1.0
    dy = torch.randn(rows, d, generator=gen)
    xq = x.to(dtype)  # the reference sees the same quantised input

    def grads(xx, mm, ww, bb, dyy, fn):
        xx, ww = xx.detach().requires_grad_(), ww.detach().requires_grad_()  # detach keeps the offset
        bb = None if rms else bb.detach().requires_grad_()
        y = fn(xx, mm, ww, 1e-5) if rms else fn(xx, mm, ww, bb, 1e-5)
        gs = torch.autograd.grad(y, [t for t in (xx, ww, bb) if t is not None], dyy.to(y.dtype))
        return [y] + list(gs)

    ref = grads(xq.double(), m.double(), w.double(), b.double(), dy.double(),
                mn.masked_rms_norm_torch if rms else mn.masked_layer_norm_torch)
    xc = torch.cat([torch.zeros(offset, dtype=dtype), xq.flatten()]).cuda()[offset:].view(rows, d)
    got = grads(xc, m.cuda(), w.cuda(), b.cuda(), dy.cuda(), mn.masked_rms_norm if rms else mn.masked_layer_norm)
    # d == 1: x - mean is one rounding error (exactly 0 in float64), amplified by 1/sqrt(eps) = 316
    tol = tol * 316 if d == 1 else tol
    for g, r in zip(got, ref):
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.double().cpu() / scale, r / scale, rtol=tol, atol=tol)
