from setuptools import find_packages, setup

setup(
    name="mnist_keras",
    version="0.1.0",
    description="MNIST classifiers with Keras 3 / TensorFlow: trained, distributed, tuned, exported.",
    packages=find_packages(include=["mnist_keras", "mnist_keras.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9",
        "numpy>=1.26",
        # TF 2.21 no longer pulls TensorBoard in; the run folders carry its logs.
        "tensorboard>=2.21,<2.22",
    ],
    extras_require={
        # psutil: the multi-worker tests find and kill one worker of a launched cluster.
        "dev": ["pytest>=8", "psutil>=5.9"],
    },
    entry_points={
        "console_scripts": [
            "mnist-keras-train=mnist_keras.cli:train_main",
        ],
    },
)
