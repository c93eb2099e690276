"""Masked GPT on megatron-core: norms, attention, MLP, layer spec, model."""
from .gpt import MaskedGPT, build_model, count_parameters, padded_vocab_size  # noqa: F401
from .masks import ramping, refresh_active, update_masks  # noqa: F401
