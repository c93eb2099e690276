"""The README's install builds the CPU kernel in a fresh venv, with or without `wheel` installed
(with `wheel`, pip 23.x used to take the legacy `setup.py develop` path, which setuptools >= 80
reruns in an isolated build without torch: the kernel was silently not built; pyproject.toml
fixes it). The venv sees this machine's torch (--system-site-packages), as a user's venv with
torch installed first would."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # processes, training runs: the full tier (README); `-m "not slow"` skips it


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("with_wheel", [False, True])
def test_editable_install_builds_the_cpu_kernel_in_a_fresh_venv(tmp_path, with_wheel):
    import setuptools

    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns("*.so", "build", ".git", "runs", "__pycache__",
                                                             "*.egg-info", ".pytest_cache"))
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    assert r.returncode == 0, r.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q"]
    extra = [f"setuptools=={setuptools.__version__}"] + (["wheel"] if with_wheel else [])
    r = _run(pip + ["install"] + extra)
    if r.returncode != 0:
        pytest.skip(f"cannot install {extra} into the venv (no package index?): {r.stderr[-300:]}")
    r = _run(pip + ["install", "--no-build-isolation", "--no-deps", "-e", str(src)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([str(venv / "bin" / "python"), "-c",
              "import msg_megatron, msg_megatron.ops as o; print(msg_megatron.__file__); print(o.backend())"],
             cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=""))
    assert r.returncode == 0, r.stderr[-3000:]
    where, backend = r.stdout.split()[-2:]
    assert where.startswith(str(src)) and backend == "cpu-ext", (r.stdout, r.stderr[-2000:])
