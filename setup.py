from setuptools import find_packages, setup

# Optional features, each its own extra; `dev` is everything the tests need.
EXTRAS = {
    # psutil: peak resident memory per benchmark row; the multi-worker tests find and kill a worker.
    "benchmark": ["psutil>=5.9"],
    # keras-tuner searches (scripts/tune.py); the bayesian tuner needs scipy and scikit-learn. grpcio
    # (keras-tuner's own dependency) is imported directly by the distributed search (tune_distributed).
    "tune": ["keras-tuner>=1.4.8,<1.5", "scipy>=1.11", "scikit-learn>=1.3", "grpcio>=1.60"],
    # The draw-a-digit web app (scripts/serve.py).
    "serve": ["gradio>=6.31,<6.32"],
    # --data-source tfds: MNIST through tensorflow-datasets (it pulls pyarrow and more, ~220 MB).
    "tfds": ["tensorflow-datasets>=4.9"],
    # Training on NVIDIA GPUs: TensorFlow with its CUDA libraries (Linux). CI runs on CPU only.
    "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
    # Its browser test also needs Playwright and a Chromium: Debian's `chromium`
    # package (.ci/run installs it with apt-get; Playwright's own download is not used).
    "browser": ["gradio>=6.31,<6.32", "playwright>=1.65"],
}
# Everything but the GPU build: CI and the tests run on CPU.
EXTRAS["dev"] = sorted({"pytest>=8", *(requirement for name, extra in EXTRAS.items() if name != "gpu"
                                       for requirement in extra)})

setup(
    name="mnist_keras",
    version="0.1.0",
    description="MNIST classifiers with Keras 3 / TensorFlow: trained, distributed, tuned, exported.",
    packages=find_packages(include=["mnist_keras", "mnist_keras.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "numpy>=1.26",
        # TF 2.21 no longer pulls TensorBoard in; the run folders carry its logs.
        "tensorboard>=2.21,<2.22",
        # LiteRT's Interpreter runs the exported .tflite files (export checks, evaluate, predict).
        "ai-edge-litert>=2.1",
        # Evaluation plots, and reading users' digit images for predict.
        "matplotlib>=3.8",
        "pillow>=10",
    ],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "mnist-keras-train=mnist_keras.cli:train_main",
            "mnist-keras-export=mnist_keras.cli:export_main",
            "mnist-keras-tune=mnist_keras.cli:tune_main",
            "mnist-keras-evaluate=mnist_keras.cli:evaluate_main",
            "mnist-keras-predict=mnist_keras.cli:predict_main",
            "mnist-keras-benchmark=mnist_keras.cli:benchmark_main",
            "mnist-keras-results=mnist_keras.cli:results_main",
            "mnist-keras-serve=mnist_keras.cli:serve_main",
        ],
    },
)
