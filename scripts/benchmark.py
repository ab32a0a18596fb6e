"""Benchmark training and inference: `python scripts/benchmark.py --arch cnn` (same as `mnist-keras-benchmark`)."""
from mnist_keras.cli import benchmark_main

raise SystemExit(benchmark_main())
