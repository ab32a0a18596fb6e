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
        "dev": ["pytest>=8", "gradio>=6.31,<6.32", "playwright>=1.65"],
        # The draw-a-digit web app (scripts/serve.py). Its browser test also needs Playwright
        # and a Chromium: Debian's `chromium` package (CI installs it with apt-get).
        "serve": ["gradio>=6.31,<6.32"],
        "browser": ["gradio>=6.31,<6.32", "playwright>=1.65"],
    },
    entry_points={
        "console_scripts": [
            "mnist-keras-train=mnist_keras.cli:train_main",
            "mnist-keras-serve=mnist_keras.cli:serve_main",
        ],
    },
)
