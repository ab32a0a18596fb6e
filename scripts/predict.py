"""Classify your own digit images: `python scripts/predict.py IMAGE...` (same as `mnist-keras-predict`)."""
from mnist_keras.cli import predict_main

raise SystemExit(predict_main())
