"""msg-megatron: Masked Structural Growth pre-training on megatron-core.

Install on a CPU machine without pulling CUDA wheels:
    pip install torch==2.13.0 && pip install --no-build-isolation -e .
(`--no-build-isolation` keeps pip from fetching a second, CUDA, torch into an isolated build env.)
"""
import platform
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


def _extensions():
    """The CPU masked-norm extension (csrc/), when torch is importable at build time.

    It is optional: without it (no compiler, no torch in the build env) msg_megatron.ops falls
    back to pure PyTorch and `msg_megatron.ops.backend()` says so.
    """
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        import sys

        print("msg-megatron: WARNING: torch is not importable in this build environment, so the CPU "
              "masked-norm kernel is NOT built (the pure-PyTorch norms will run, with a warning at first use). "
              "Fix: install torch first, then `pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], build_ext
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - a failed kernel build must not fail the install
                import sys

                print(f"msg-megatron: WARNING: building {ext.name} failed ({e}); the pure-PyTorch "
                      "masked norms will be used (a warning at first use says so too)", file=sys.stderr)

    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64"):
        # AVX2 + FMA (x86-64-v3): 8-wide float loops. msg_megatron.ops checks the running CPU
        # (torch.backends.cpu.get_cpu_capability) and falls back to pure PyTorch without AVX2.
        flags.append("-march=x86-64-v3")
    ext = CppExtension("msg_megatron._masked_norm_cpu", ["csrc/masked_norm_cpu.cpp"],
                       extra_compile_args=flags, extra_link_args=["-fopenmp"])
    exts = [ext]
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda and CUDA_HOME:  # a CUDA build of torch: the GPU kernels too
        from torch.utils.cpp_extension import CUDAExtension

        exts.append(CUDAExtension(
            "msg_megatron._masked_norm_cuda", ["csrc/masked_norm_cuda_bind.cpp", "csrc/masked_norm_cuda.cu"],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]}))
    return exts, OptionalBuildExtension.with_options(no_python_abi_suffix=True, use_ninja=False)


EXTENSIONS, BUILD_EXT = _extensions()
HF = ["transformers==5.23.0", "safetensors>=0.4", "tokenizers>=0.20"]
# lm-evaluation-harness; [hf] brings accelerate, which its package import needs; this release leaves
# the installed torch alone
EVAL = ["lm-eval[hf]==0.4.13"] + HF

VERSION = re.search(r'__version__ = "([^"]+)"', Path("msg_megatron/__init__.py").read_text()).group(1)

setup(
    name="msg-megatron",
    version=VERSION,
    description="Megatron-style trainer with Masked Structural Growth (strictly function-preserving model growth)",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["msg_megatron", "msg_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the install command (a local CPU build here); a range keeps pip from
        # replacing an installed build with a CUDA wheel.
        "torch>=2.4,<=2.14.1",
        "megatron-core==0.16.1",
        "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
        "sentencepiece>=0.2",
        "wandb>=0.17",
        "pybind11>=2.12",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # Hugging Face export/import; this transformers release installs without touching torch
        "hf": HF,
        "plot": ["matplotlib>=3.7"],  # msg-plot
        "eval": EVAL,  # msg-eval --tasks, train.eval_tasks
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "matplotlib>=3.7"] + HF + EVAL,
    },
    # the offline lm-eval tasks (YAML, JSONL, their loader): data files of the package
    package_data={"msg_megatron": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"]},
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BUILD_EXT},
    entry_points={
        "console_scripts": [
            "msg-pretrain=msg_megatron.pretrain:main",
            "msg-eval=msg_megatron.eval:main",
            "msg-grow=msg_megatron.grow:main",
            "msg-preprocess=msg_megatron.preprocess:main",
            "msg-export-hf=msg_megatron.hf.export:main",
            "msg-import-hf=msg_megatron.hf.import_hf:main",
            "msg-import-megatron=msg_megatron.import_megatron:main",
            "msg-export-megatron=msg_megatron.export_megatron:main",
            "msg-generate=msg_megatron.generate:main",
            "msg-gridsearch=msg_megatron.gridsearch:main",
            "msg-plan=msg_megatron.plan:main",
            "msg-schedule=msg_megatron.schedule_from_auto:main",
            "msg-plot=msg_megatron.plot:main",
        ]
    },
)
