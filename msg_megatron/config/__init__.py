"""Typed run configuration: YAML in, `section.field=value` overrides, validation before any compute.

`schema.py` holds the sections and fields, `loading.py` reads YAML and overrides, `checks.py`
refuses bad values (and `growth_refusal`, the one rule of what a growth may not do).
"""
from .checks import RANGES, growth_refusal, validate  # noqa: F401
from .loading import config_from_dict, load_config, parse_override  # noqa: F401
from .schema import (  # noqa: F401
                     AutoGrowthConfig,
                     CheckpointConfig,
                     Config,
                     ConfigError,
                     DataConfig,
                     GrowthConfig,
                     LoggingConfig,
                     ModelConfig,
                     ParallelConfig,
                     Shape,
                     StageConfig,
                     TrainConfig,
)
