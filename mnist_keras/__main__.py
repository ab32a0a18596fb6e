"""`python -m mnist_keras COMMAND [FLAGS]`: every command, with the same flags and exit codes as its script."""

from mnist_keras.cli import main

raise SystemExit(main())
