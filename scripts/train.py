"""Train an MNIST model: `python scripts/train.py --arch cnn` (same as `mnist-keras-train`)."""
from mnist_keras.cli import train_main

raise SystemExit(train_main())
