"""Search hyperparameters: `python scripts/tune.py --arch mlp --tuner random` (same as `mnist-keras-tune`)."""
from mnist_keras.cli import tune_main

raise SystemExit(tune_main())
