"""mnist_keras: MNIST classifiers trained, distributed, tuned and shipped with Keras 3.

The package is layered so that arrows point down only:

    cli                       argv parsing, printing, exit codes
    train  tune  serve  benchmark
    loop  export  evaluate  predict
    config  data  models  strategy  artifacts

Importing the package itself does not import TensorFlow; each module imports
what it needs.
"""

__version__ = "0.1.0"
