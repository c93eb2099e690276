"""msg-megatron: Masked Structural Growth (MSG) pre-training on megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core announces its pure-PyTorch fallbacks on import; they are expected on CPU.
_warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
_warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
_warnings.filterwarnings("ignore", message=".*Apex is not installed. Falling back to Torch Norm.*")  # we use our own norms
# megatron's torch_dist loader calls torch's deprecated `load_state_dict` on every checkpoint load
_warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*", category=FutureWarning)
