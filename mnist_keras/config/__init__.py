"""Frozen run configurations and the CLI flags made from them.

Every job has one frozen dataclass. Its fields are the job's only knobs: the
command-line flags are generated from the fields (so flags and config cannot
drift apart), and the resolved config is written as JSON next to every
artifact the job produces. Per-architecture defaults (presets and recipes)
come from the registry in `archs`.

- `fields`: the field helper, range/choice checks, shared choices and option blocks;
- `flags`: flags from a config class, configs resolved from flags, JSON round trip;
- `training`: the configs of train, tune and export;
- `tools`: the configs of evaluate, predict, serve, benchmark and results.

This package is the ground floor: it imports neither TensorFlow nor Keras, so
`--help` and flag errors stay instant. Import names from here
(`from mnist_keras.config import TrainConfig`).
"""

from mnist_keras.config.fields import (  # noqa: F401
    CLUSTERS,
    DATA_SOURCES,
    INT8_IO_TYPES,
    LR_SCHEDULES,
    MODELS_ROOT,
    STRATEGIES,
    TFLITE_VARIANTS,
    TUNE_STRATEGIES,
    TUNERS,
    check_choice,
    check_range,
    flag_name,
    option,
)
from mnist_keras.config.flags import (  # noqa: F401
    add_config_flags,
    config_from_dict,
    config_from_flags,
    config_to_dict,
    preset_config,
    read_config_file,
    train_config,
)
from mnist_keras.config.tools import (  # noqa: F401
    BenchmarkConfig,
    EvaluateConfig,
    PredictConfig,
    ResultsConfig,
    ServeConfig,
    parse_seeds,
)
from mnist_keras.config.training import ExportConfig, TrainConfig, TuneConfig  # noqa: F401
from mnist_keras.errors import ConfigError, UsageError  # noqa: F401
