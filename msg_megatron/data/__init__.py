"""Embedded corpus, lossless tokenizer, indexed datasets and training windows."""
from .loader import SyntheticWindows, TokenWindows, validation_problem  # noqa: F401
from .prepare import (  # noqa: F401
    DataError,
    check_prepared_dir,
    resolve_data_dir,
    resolve_data_dir_all_ranks,
)
from .tokenizer import Tokenizer  # noqa: F401
