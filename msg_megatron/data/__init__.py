"""Embedded corpus, tokenizers, prepared data, blends through megatron's datasets, synthetic windows."""
from .loader import SyntheticWindows, validation_problem  # noqa: F401
from .prepare import DataError, check_prepared_dir, resolve_data_dir, resolve_data_dir_all_ranks  # noqa: F401
from .tokenizer import Tokenizer  # noqa: F401
