"""Draw a digit in the browser: `python scripts/serve.py --arch cnn` (same as `mnist-keras-serve`)."""
from mnist_keras.cli import serve_main

raise SystemExit(serve_main())
