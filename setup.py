from setuptools import setup

# Optional features, each its own extra; `dev` is everything the tests need.
EXTRAS = {
    # psutil: peak resident memory per benchmark row; the multi-worker tests find and kill a worker.
    "benchmark": ["psutil>=5.9"],
    # keras-tuner searches (scripts/tune.py); the bayesian tuner needs scipy and scikit-learn. grpcio
    # (keras-tuner's own dependency) is imported directly by the distributed search (tune_distributed).
    "tune": ["keras-tuner>=1.4.8,<1.5", "scipy>=1.11", "scikit-learn>=1.3", "grpcio>=1.60"],
    # The draw-a-digit web app (scripts/serve.py).
    "serve": ["starlette>=0.40", "uvicorn>=0.30"],
    # --data-source tfds: MNIST through tensorflow-datasets (it pulls pyarrow and more, ~220 MB).
    "tfds": ["tensorflow-datasets>=4.9"],
    # Training on NVIDIA GPUs: TensorFlow with its CUDA libraries (Linux). CI runs on CPU only.
    "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
    # Its browser test also needs Playwright and a Chromium: Debian's `chromium`
    # package (.ci/run installs it with apt-get; Playwright's own download is not used).
    "browser": ["starlette>=0.40", "uvicorn>=0.30", "playwright>=1.65"],
    # ONNX export (tf2onnx, which Keras' own model.export(format="onnx") uses) and running .onnx files.
    "onnx": ["tf2onnx>=1.17", "onnxruntime>=1.20"],
    # TensorBoard's Profile tab, for the traces train.py --profile-steps records.
    "profile": ["tensorboard-plugin-profile>=2.20"],
    # Mutation testing by hand, never in CI (tests/mutate.sh, docs/testing.md); mutmut 3 works differently.
    "mutation": ["mutmut>=2.5,<3", "whatthepatch>=1.0"],
}
# Everything but the GPU build (CI and the tests run on CPU) and the mutation tool (run by hand).
# pytest-xdist: the suite runs on every core (tests/conftest.py keeps each test module on one worker).
EXTRAS["dev"] = sorted({"pytest>=8", "pytest-xdist>=3.5", *(requirement for name, extra in EXTRAS.items()
                                       if name not in ("gpu", "mutation") for requirement in extra)})

# Everything else (name, version, dependencies, console scripts, licence) is in pyproject.toml.
setup(extras_require=EXTRAS)
