"""Evaluate a model or compare every run: `python scripts/evaluate.py --arch cnn` (same as `mnist-keras-evaluate`)."""
from mnist_keras.cli import evaluate_main

raise SystemExit(evaluate_main())
