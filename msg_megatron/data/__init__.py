"""Embedded corpus, lossless tokenizer, indexed datasets and training windows."""
from .loader import SyntheticWindows, TokenWindows, validation_problem  # noqa: F401
from .prepare import DataError, check_prepared_dir, resolve_data_dir, resolve_data_dir_all_ranks  # noqa: F401
from .tokenizer import Tokenizer  # noqa: F401
