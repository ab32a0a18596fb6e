"""The results table: every arch and recipe over several seeds: `python scripts/results.py --seeds 1-5`."""
from mnist_keras.cli import results_main

raise SystemExit(results_main())
