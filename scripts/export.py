"""Export a trained model to SavedModel and TFLite: `python scripts/export.py --arch cnn` (same as `mnist-keras-export`)."""
from mnist_keras.cli import export_main

raise SystemExit(export_main())
