"""The configs of the jobs that train: train, tune and export."""

from __future__ import annotations

import dataclasses
from typing import Optional

from mnist_keras.config.fields import (
    CLUSTERS,
    INT8_IO_TYPES,
    LR_SCHEDULES,
    STRATEGIES,
    TFLITE_VARIANTS,
    TUNE_STRATEGIES,
    TUNERS,
    arch_option,
    check_arch,
    check_choice,
    check_data_options,
    check_range,
    cluster_option,
    data_dir_option,
    data_source_option,
    devices_option,
    option,
    output_dir_option,
)
from mnist_keras.errors import ConfigError
from mnist_keras.models import archs

# --preemption-signal: a signal that, like SIGTERM, makes a run save at the next group of steps and exit 75.
PREEMPTION_SIGNALS = ("none", "USR1", "USR2")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Presets fill in per-arch defaults."""

    arch: str = arch_option("Model architecture.")
    epochs: int = option(10, "Training epochs.")
    batch_size: int = option(128, "Global batch size (split across all replicas).")
    learning_rate: float = option(1e-3, "Peak Adam learning rate.")
    lr_schedule: str = option("cosine", "Learning-rate schedule: linear warmup then cosine decay to 0, "
                              "or constant.", choices=LR_SCHEDULES)
    warmup_epochs: float = option(0.5, "Epochs of linear learning-rate warmup (cosine schedule only).")
    validation_size: int = option(5000, "Images carved from the training set for validation.")
    seed: int = option(1, "Random seed for weights, the validation split and shuffling.")
    steps_per_execution: int = option(100, "Training steps run per tf.function call "
                                      "(fewer Python round trips; the progress bar moves in these steps).")
    strategy: str = option("auto", "tf.distribute strategy. auto: multi_worker when the cluster (--cluster) has "
                           "several workers, mirrored when several GPUs are visible, else default.",
                           choices=STRATEGIES)
    cluster: str = cluster_option("Where the other workers come from. slurm: the tasks of this Slurm step "
                                  "(srun -n N), ports from the job; tf_config: TF_CONFIG; local: none (one "
                                  "process); auto: slurm in a step of several tasks, else tf_config when "
                                  "TF_CONFIG is set, else local.")
    connect_timeout: float = option(300.0, "multi_worker: seconds a worker waits at start-up for the others to "
                                    "join before it exits with an error naming the address it waited for.")
    devices: tuple = devices_option()
    data_source: str = data_source_option()
    data_dir: Optional[str] = data_dir_option()
    output_dir: Optional[str] = output_dir_option("Run folder. Default: saved_models/<arch>.")
    workers: int = option(1, "Start this many worker processes on local loopback ports and train with "
                          "multi_worker across them (each runs this same command with TF_CONFIG set).")
    stall_timeout: float = option(300.0, "multi_worker: a worker that finishes no training or evaluation step "
                                  "(nor an epoch's backup) for this many seconds exits with an error, so a "
                                  "stuck peer cannot hang the run (one watchdog thread per worker; 0: off). "
                                  "Counts from the start of training, so it must exceed the first step's "
                                  "tracing.")
    collective_timeout: float = option(0.0, "multi_worker: seconds one all-reduce may wait for the other workers "
                                       "before the run fails (0: no limit). Costly: TensorFlow parks one thread "
                                       "per collective for the whole timeout, so threads grow with steps per "
                                       "second times this value; --stall-timeout is the cheap bound.")
    max_restarts: int = option(0, "--workers N: when a worker fails (or a peer stops answering), stop every worker "
                               "and start them all again from the backup, up to this many times.")
    preemption_signal: str = option("none", "A signal that, like SIGTERM, saves the run at the next group of steps "
                                    "and exits with status 75 (to resume); e.g. USR1 with Slurm's "
                                    "--signal=B:USR1@120.", choices=PREEMPTION_SIGNALS)
    overwrite: bool = option(False, "Replace an existing finished run in the output folder (and start fresh when "
                             "the backup of an unfinished one cannot be read).")
    export: bool = option(False, "After training, export the model into <run folder>/export/: a SavedModel, "
                          "every TFLite variant and model.onnx (the onnx extra), each loaded back and scored on "
                          "the test set.")
    dry_run: bool = option(False, "Train and evaluate on a few batches only, and write nothing.")
    verbose: int = option(1, "0: quiet, 1: progress bar per epoch.")
    recipe: str = option("default", archs.recipes_help, choices=archs.RECIPES)
    shift_pixels: int = option(0, "Random-shift augmentation: move every training image by up to this many "
                               "pixels in x and y (vectorised, per batch, in the input pipeline). 0: off.")
    rotation_degrees: float = option(0.0, "Random-rotation augmentation: turn every training image by up to this "
                                     "many degrees either way about its centre. 0: off.")
    scale_range: float = option(0.0, "Random-scaling augmentation: zoom every training image by a factor in "
                                "[1 - s, 1 + s] about its centre. 0: off.")
    label_smoothing: float = option(0.0, "Train towards 1 - s + s/10 on the true digit and s/10 on each other "
                                    "one (reported losses stay plain cross-entropy). 0: off.")
    ema_momentum: float = option(0.0, "Keep an exponential moving average of the weights with this momentum "
                                 "per step (Keras' use_ema) and end training with the averaged weights. 0: off.")
    profile_steps: str = option("", "Record a TensorFlow profiler trace of training steps A to B (1-based; whole "
                                "--steps-per-execution groups) into <run folder>/logs/train, for TensorBoard's "
                                "Profile tab (the profile extra). Default: none.", metavar="A,B")
    callback: tuple = option((), "A Keras callback to train with, as module:attribute (a keras.callbacks.Callback "
                             "subclass or a function returning one; the module is imported from the current "
                             "folder or sys.path). Repeatable; every worker runs it.", metavar="MODULE:ATTRIBUTE",
                             repeatable=True)
    deterministic: bool = option(False, "Make every TensorFlow op deterministic "
                                 "(tf.config.experimental.enable_op_determinism): the same seed gives bit-identical "
                                 "weights, on GPU too, at a cost in speed (docs/training.md).")
    mixed_precision: bool = option(False, "Compute in 16-bit floats with float32 weights (mixed_float16 on GPU, "
                                   "mixed_bfloat16 on CPU); the softmax output stays float32.")

    def __post_init__(self) -> None:
        check_arch(self)
        check_choice("recipe", self.recipe, archs.RECIPES)
        check_range("shift_pixels", self.shift_pixels, minimum=0, maximum=8)
        # Beyond these, digits turn into other digits (a 6 into a 9) or leave the 28x28 frame.
        check_range("rotation_degrees", self.rotation_degrees, minimum=0.0, maximum=45.0)
        check_range("scale_range", self.scale_range, minimum=0.0, maximum=0.5)
        check_range("label_smoothing", self.label_smoothing, minimum=0.0, maximum=0.5)
        check_range("ema_momentum", self.ema_momentum, minimum=0.0, maximum=0.9999)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_data_options(self)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("epochs", self.epochs, minimum=1)
        check_range("batch_size", self.batch_size, minimum=1)
        check_range("learning_rate", self.learning_rate, minimum=0.0, exclusive=True)
        check_range("warmup_epochs", self.warmup_epochs, minimum=0.0)
        check_range("validation_size", self.validation_size, minimum=0, maximum=59_000)
        check_range("steps_per_execution", self.steps_per_execution, minimum=1)
        check_range("seed", self.seed, minimum=0)
        check_range("workers", self.workers, minimum=1)
        check_range("collective_timeout", self.collective_timeout, minimum=0.0)
        check_range("stall_timeout", self.stall_timeout, minimum=0.0)
        self.profile_range  # noqa: B018  (checks --profile-steps)
        for name in self.callback:
            module, _, attribute = name.partition(":")
            if not module or not attribute:
                raise ConfigError(f"--callback must be module:attribute (e.g. my_callbacks:make_logger). "
                                  f"Received: {name!r}")
        check_range("max_restarts", self.max_restarts, minimum=0)
        check_choice("preemption_signal", self.preemption_signal, PREEMPTION_SIGNALS)
        if self.max_restarts and self.workers < 2:
            raise ConfigError(f"--max-restarts restarts the workers of --workers N (N >= 2). "
                              f"Received: --max-restarts {self.max_restarts} --workers {self.workers}")
        check_choice("cluster", self.cluster, CLUSTERS)
        check_range("connect_timeout", self.connect_timeout, minimum=0.0, exclusive=True)
        if self.workers > 1 and self.cluster not in ("auto", "local"):
            raise ConfigError(f"--workers {self.workers} starts its own cluster on this machine; drop it, or "
                              f"--cluster. Received: --cluster {self.cluster}")
        if self.workers > 1 and self.strategy not in ("auto", "multi_worker"):
            raise ConfigError(f"--workers {self.workers} needs --strategy auto or multi_worker. "
                              f"Received: --strategy {self.strategy}")

    @property
    def profile_range(self) -> Optional[tuple[int, int]]:
        """--profile-steps A,B as (A, B); None when not given."""
        if not self.profile_steps:
            return None
        parts = self.profile_steps.split(",")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ConfigError(f"--profile-steps must be two step numbers A,B. Received: {self.profile_steps!r}")
        first, last = (int(part) for part in parts)
        if not 1 <= first <= last:
            raise ConfigError(f"--profile-steps must be A,B with 1 <= A <= B. Received: {self.profile_steps!r}")
        return first, last


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Everything that decides an export: which model, which TFLite variants, where, and the data
    used for int8 calibration (training images) and scoring (the full test set)."""

    arch: str = arch_option("Architecture whose run folder saved_models/<arch>/ holds the model "
                       "(ignored with --model).")
    model: Optional[str] = option(None, "The .keras file (or run folder) to export. "
                                  "Default: saved_models/<arch>/model.keras.", metavar="PATH")
    output_dir: Optional[str] = output_dir_option("Export folder. Default: export/ beside the model.")
    tflite: tuple = option(TFLITE_VARIANTS, "Comma-separated TFLite variants to write, among "
                           f"{', '.join(TFLITE_VARIANTS)} (\"\" for none).", metavar="VARIANT[,...]")
    int8_io: str = option("int8", "Input and output type of the full-integer TFLite model.",
                          choices=INT8_IO_TYPES)
    calibration_size: int = option(1000, "Training images (a seeded random sample) that calibrate the int8 model.")
    seed: int = option(1, "Seed of the calibration sample.")
    data_source: str = data_source_option(" (calibration and scoring)")
    data_dir: Optional[str] = data_dir_option()
    serving_version: int = option(1, "Version folder of the SavedModel: saved_model/<version>/, the layout "
                                  "TensorFlow Serving reads a model base path in.")
    # None: model.onnx when the onnx extra is installed, so a plain install exports everything else.
    onnx: Optional[bool] = option(None, "Also write model.onnx, scored with onnxruntime (the onnx extra). "
                                        "Default: when that extra is installed; --onnx insists, --no-onnx skips it.")
    overwrite: bool = option(False, "Replace an existing export in the output folder.")
    verbose: int = option(1, "0: quiet, 1: log each step.")

    def __post_init__(self) -> None:
        check_arch(self)
        check_choice("int8_io", self.int8_io, INT8_IO_TYPES)
        check_data_options(self)
        unknown = [variant for variant in self.tflite if variant not in TFLITE_VARIANTS]
        if unknown:
            raise ConfigError(f"--tflite variants must be among {', '.join(TFLITE_VARIANTS)}. "
                              f"Received: {unknown[0]!r}")
        if len(set(self.tflite)) != len(self.tflite):
            raise ConfigError(f"--tflite names a variant twice. Received: {','.join(self.tflite)}")
        check_range("calibration_size", self.calibration_size, minimum=1)
        check_range("seed", self.seed, minimum=0)
        check_range("serving_version", self.serving_version, minimum=1)


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """A keras-tuner search over layer sizes and the learning rate, then the winner retrained.

    Every trial trains like `train.py` (same data split, schedule, loop and
    strategy) with `epochs` epochs, scored by validation accuracy. The search
    space bounds must contain the architecture's seed values (the fixed models),
    which are always the first trial.
    """

    arch: str = arch_option("Model architecture to tune.")
    tuner: str = option("random", "Search algorithm (hyperband: --epochs is the most any trial trains).",
                        choices=TUNERS)
    max_trials: int = option(10, "Most trials to run (hyperband may stop earlier).")
    epochs: int = option(3, "Training epochs per trial, and for the retrained winner.")
    # None: as the architecture's training preset has it (train.py --help shows each one's), so that
    # trials train as the user will, with the preset's augmentation and label smoothing too.
    batch_size: Optional[int] = option(None, "Global batch size (split across all replicas). "
                                             "Default: the architecture's training preset.")
    lr_schedule: Optional[str] = option(None, "Learning-rate schedule of every trial. "
                                              "Default: the architecture's training preset.", choices=LR_SCHEDULES)
    warmup_epochs: Optional[float] = option(None, "Epochs of linear learning-rate warmup (cosine schedule only). "
                                                  "Default: the architecture's training preset.")
    min_units: int = option(16, archs.bounds_help("units", "Smallest width of a tuned dense layer"))
    max_units: int = option(512, "Largest width of a tuned dense layer.")
    min_filters: int = option(4, archs.bounds_help("filters", "Fewest filters of a tuned convolution"))
    max_filters: int = option(64, "Most filters of a tuned convolution.")
    min_learning_rate: float = option(1e-4, "Smallest peak learning rate (sampled on a log scale).")
    max_learning_rate: float = option(3e-2, "Largest peak learning rate.")
    validation_size: int = option(5000, "Images carved from the training set for validation (the objective).")
    seed: int = option(1, "Random seed for the tuner, weights, the validation split and shuffling.")
    steps_per_execution: int = option(100, "Training steps run per tf.function call.")
    strategy: str = option("auto", "tf.distribute strategy for every trial (single worker).",
                           choices=TUNE_STRATEGIES)
    devices: tuple = devices_option()
    cluster: str = cluster_option("Where the search's processes come from. slurm: the tasks of this Slurm "
                                  "step (srun -n N: task 0 holds the oracle, the others train trials); local: "
                                  "one process (or --workers); auto: slurm in a step of several tasks, else "
                                  "local. tf_config: refused (a trial trains in one process).")
    data_source: str = data_source_option()
    data_dir: Optional[str] = data_dir_option()
    output_dir: Optional[str] = output_dir_option("Search folder. Default: saved_models/tune/<arch>.")
    overwrite: bool = option(False, "Delete a previous search in the output folder and start again "
                             "(without it, an unfinished search resumes).")
    verbose: int = option(1, "0: quiet, 1: one line per trial, 2: also a progress bar per epoch.")
    workers: int = option(1, "Train trials in this many tuner processes at once, on this machine: starts the "
                          "oracle chief and N tuners on a loopback port (each runs this same command with "
                          "keras-tuner's KERASTUNER_* variables set). 1: every trial in this process.")
    worker_timeout: float = option(60.0, "Distributed search: seconds of silence after which the chief gives "
                                   "a tuner's trial to another tuner, and a tuner gives up on the chief "
                                   "(also how long a tuner waits for the chief to start).")

    def __post_init__(self) -> None:
        check_arch(self)
        check_choice("tuner", self.tuner, TUNERS)
        check_choice("strategy", self.strategy, TUNE_STRATEGIES)
        check_choice("cluster", self.cluster, CLUSTERS)
        check_data_options(self)
        if self.lr_schedule is not None:
            check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("max_trials", self.max_trials, minimum=1)
        check_range("epochs", self.epochs, minimum=1)
        if self.batch_size is not None:
            check_range("batch_size", self.batch_size, minimum=1)
        if self.warmup_epochs is not None:
            check_range("warmup_epochs", self.warmup_epochs, minimum=0.0)
        check_range("min_units", self.min_units, minimum=1)
        check_range("max_units", self.max_units, minimum=self.min_units)
        check_range("min_filters", self.min_filters, minimum=1)
        check_range("max_filters", self.max_filters, minimum=self.min_filters)
        check_range("min_learning_rate", self.min_learning_rate, minimum=0.0, exclusive=True)
        check_range("max_learning_rate", self.max_learning_rate, minimum=self.min_learning_rate)
        check_range("max_learning_rate", self.max_learning_rate, maximum=1.0)
        # A validation split is the objective: it cannot be empty.
        check_range("validation_size", self.validation_size, minimum=1, maximum=59_000)
        check_range("steps_per_execution", self.steps_per_execution, minimum=1)
        check_range("seed", self.seed, minimum=0)
        check_range("verbose", self.verbose, minimum=0, maximum=2)
        check_range("workers", self.workers, minimum=1)
        check_range("worker_timeout", self.worker_timeout, minimum=1.0)


