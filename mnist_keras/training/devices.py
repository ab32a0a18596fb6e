"""Which GPUs each worker of the local launcher gets (`CUDA_VISIBLE_DEVICES`), so two workers never
share a GPU when there are enough. GPU paths are tested on CPU only, with a faked GPU list.

This module imports neither TensorFlow nor Keras (the launcher does no TensorFlow work).
"""

from __future__ import annotations

import os
import subprocess
from typing import Mapping, Optional


def visible_gpus(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """The GPUs a worker could use: CUDA_VISIBLE_DEVICES when set, else those nvidia-smi lists (none without it)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [gpu.strip() for gpu in env["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip() not in ("", "-1")]
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def worker_devices(workers: int, env: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Each worker's CUDA_VISIBLE_DEVICES: the visible GPUs split into `workers` equal runs (round robin when
    there are fewer GPUs than workers); no variable at all when no GPU is visible."""
    gpus = visible_gpus(env)
    if not gpus:
        return [{} for _ in range(workers)]
    if len(gpus) < workers:
        return [{"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} for index in range(workers)]
    per_worker = len(gpus) // workers
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[index * per_worker:(index + 1) * per_worker])}
            for index in range(workers)]
