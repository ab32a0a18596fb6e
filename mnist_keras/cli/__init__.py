"""The command line: the only layer that parses argv and prints. Each `*_main(argv=None) -> int` is a
console script (`mnist-keras-*`), a `scripts/*.py` shim and a `python -m mnist_keras COMMAND`."""

from mnist_keras.cli.commands import (  # noqa: F401  (the entry points' public names)
    benchmark_main,
    evaluate_main,
    export_main,
    main,
    predict_main,
    results_main,
    serve_main,
    train_main,
    tune_main,
)
