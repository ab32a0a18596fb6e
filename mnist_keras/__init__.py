"""mnist_keras: MNIST classifiers trained, distributed, tuned and shipped with Keras 3.

The package stands on floors, arrows pointing down only: README's "How the
code is organised" gives every module its floor and its one job, and
tests/test_layout.py holds that table to the imports.

Importing the package itself does not import TensorFlow; each module imports
what it needs.
"""

__version__ = "0.1.0"
