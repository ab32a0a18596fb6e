"""mnist_keras: MNIST classifiers trained, distributed, tuned and shipped with Keras 3.

Sub-packages by job (models, config, storage, data, export, training, tuning,
evaluation, serving, benchmarking, cli), imports pointing one way only:
docs/architecture.md gives every module its place and its one job, and
tests/test_layout.py holds that table to the imports.

Importing the package itself does not import TensorFlow; each module imports
what it needs.
"""

__version__ = "0.1.0"
