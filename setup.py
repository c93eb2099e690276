"""msg-megatron: Masked Structural Growth pre-training on megatron-core.

Install on a CPU machine without pulling CUDA wheels:
    pip install torch==2.13.0 && pip install --no-build-isolation -e .
(`--no-build-isolation` keeps pip from fetching a second, CUDA, torch into an isolated build env.)
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

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
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "msg-pretrain=msg_megatron.pretrain:main",
            "msg-eval=msg_megatron.eval:main",
            "msg-grow=msg_megatron.grow:main",
            "msg-preprocess=msg_megatron.preprocess:main",
        ]
    },
)
