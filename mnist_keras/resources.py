"""What a process holds (threads, resident memory, open files), read from /proc, and a per-epoch log of it.

Every run with an output folder appends one JSON line per epoch to
`<run>/logs/resources[-worker-<i>].jsonl`, so a long run shows whether
anything grows with the number of steps; the soak benchmark and the
resource-growth tests read these files.

Linux only (/proc); elsewhere the figures are None. This module imports
neither TensorFlow nor Keras.
"""

from __future__ import annotations

import json
import os
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
