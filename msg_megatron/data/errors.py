"""The data layer's one error type."""


class DataError(RuntimeError):
    """Prepared data that is missing, corrupt or does not fit the config."""
