"""What a process holds (threads, resident memory, open files), read from /proc, and a per-epoch log of it.

Every run with an output folder appends one JSON line per epoch to
`<run>/logs/resources[-worker-<i>].jsonl`, so a long run shows whether
anything grows with the number of steps; the soak benchmark and the
resource-growth tests read these files.

`Sampler` reads figures on a background thread while a block runs: the
benchmark's per-row peak memory (`MemorySampler`), the soak's thread counts.

Linux only (/proc); elsewhere the figures are None. This module imports
neither TensorFlow nor Keras.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Optional

RESOURCES_FILE = "resources.jsonl"


def resources_file(worker: Optional[int] = None) -> str:
    """`resources.jsonl`, or `resources-worker-<i>.jsonl` for worker i of a multi-worker run."""
    return RESOURCES_FILE if worker is None else f"resources-worker-{worker}.jsonl"


def process_resources(pid: Optional[int] = None) -> dict:
    """{threads, rss_mb, fds} of process `pid` (default: this one); None where /proc cannot tell."""
    proc = Path("/proc") / str(pid or os.getpid())
    return {"threads": _count(proc / "task"), "rss_mb": _rss_mb(proc), "fds": _count(proc / "fd")}


def _count(folder: Path) -> Optional[int]:
    try:
        return len(os.listdir(folder))
    except OSError:
        return None


def _rss_mb(proc: Path) -> Optional[float]:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_peak_rss_mb() -> float:
    """Peak resident memory of the whole process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if platform.system() == "Darwin" else 2**10), 1)


class Sampler:
    """Calls `sample()` on a background thread while a `with` block runs: on entry, then every `interval` s.

    Subclasses define `sample`; it returns False to end the sampling early
    (what it samples is gone).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()

    def sample(self) -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        while self.sample() is not False and not self._stop.wait(self.interval):
            pass

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


class MemorySampler(Sampler):
    """Peak resident set size of this process while a `with` block runs (sampled every 20 ms).

    `resource.getrusage` only knows the peak of the whole process so far, which
    after the first row of a benchmark says nothing about the next one; a
    sampling thread gives each row its own peak (it can miss a spike shorter
    than 20 ms).
    """

    INTERVAL_S = 0.02

    def __init__(self) -> None:
        import psutil

        super().__init__(self.INTERVAL_S)
        self._process = psutil.Process()
        self.peak_bytes = 0

    def __enter__(self) -> "MemorySampler":
        self.peak_bytes = self._process.memory_info().rss
        return super().__enter__()

    def sample(self) -> bool:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
        return True

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


class ResourceLog:
    """Epoch callback: append {epoch, seconds, ms_per_step, threads, rss_mb, fds} to a JSON-lines file.

    `seconds` is the wall time since the previous epoch ended (training and
    validation); `ms_per_step` divides it by `steps_per_epoch`. With `path`
    None the records are only kept in `records`.
    """

    def __init__(self, path: Optional[Path | str], steps_per_epoch: int) -> None:
        self.path = Path(path) if path is not None else None
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.records: list[dict] = []
        self._last = time.perf_counter()

    def __call__(self, epoch: int, logs: dict) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        record = {"epoch": epoch + 1, "seconds": round(seconds, 3),
                  "ms_per_step": round(1000 * seconds / self.steps_per_epoch, 3), **process_resources()}
        self.records.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def read_resource_log(path: Path | str) -> list[dict]:
    """The records of a ResourceLog file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
