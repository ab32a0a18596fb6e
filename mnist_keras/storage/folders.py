"""Folders and files written safely: modes the umask gives, temporary names that say whose they are,
folders published whole, and the leftovers of killed jobs removed.

Temporary files and folders are named `.<name>.tmp.<host>-<pid>.<random>`
beside their target, so a later run can tell a leftover of a killed job (same
host, process gone) from a job still running, and remove it. Files and folders
get the modes a plain open()/mkdir would (0644 and 0755 under umask 022), not
mkstemp's and mkdtemp's private 0600/0700.

Ground floor: no TensorFlow, nothing of the package but its errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mnist_keras.errors import UsageError

logger = logging.getLogger(__name__)

_TEMPORARY = ".tmp."
_RETIRED = ".old."


class OutputExistsError(UsageError, FileExistsError):
    """The output folder holds a finished run (and --overwrite was not given), or is not ours to write."""


class OutputNotWritableError(UsageError, PermissionError):
    """The output folder (or the folder it would be created in) cannot be written."""


def remove_entries(folder: Path, names) -> None:
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_links(folder: os.PathLike | str) -> None:
    """Refuse (one line) a path through a symbolic link that leads nowhere (dangling) or to itself (a loop)."""
    path = Path(folder)
    for part in [*reversed(path.parents), path]:
        if part.is_symlink():
            try:
                os.stat(part)
            except FileNotFoundError:
                raise OutputNotWritableError(f"{part}: a symbolic link to {os.readlink(part)}, which does not "
                                             "exist; create it or choose another --output-dir") from None
            except OSError as error:
                raise OutputNotWritableError(f"{part}: a symbolic link that cannot be followed "
                                             f"({error.strerror}); choose another --output-dir") from None


def make_folder(folder: Path) -> Path:
    """mkdir -p, with a one-line error when the place is not writable."""
    check_links(folder)
    check_writable(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise OutputNotWritableError(f"{folder}: cannot create the folder (permission denied)") from None
    return folder


def check_writable(folder: Path) -> None:
    """Refuse early (one line) a folder, or the nearest existing folder above it, that cannot be written."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"{existing}: not writable; choose another --output-dir")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode a plain open()/mkdir would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: the name's fields are separated by them


def _owner_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def temporary_prefix(target: Path) -> str:
    return f".{target.name}{_TEMPORARY}{_owner_tag()}."


def _dead_leftover(name: str) -> Optional[bool]:
    """For a temporary name of ours: True if its job is gone (same host, no such process), False if it may
    still run, None if the name carries no owner (a leftover of an older version)."""
    for kind in (_TEMPORARY, _RETIRED):
        if kind in name:
            owner = name.split(kind, 1)[1].split(".", 1)[0]
            host, _, pid = owner.rpartition("-")
            if not pid.isdigit() or not host:
                return None
            if host != _host():
                return False
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
    return False


def clean_leftovers(folder: os.PathLike | str) -> list[Path]:
    """Remove the temporary files and folders that killed jobs left in `folder`; return what was removed.

    A retired folder (`.<name>.old.*`, the previous version of `<name>` set aside
    while the new one was renamed into place) whose `<name>` is missing is put
    back rather than removed. Leftovers whose owner cannot be told are reported.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        name = path.name
        if not name.startswith(".") or (_TEMPORARY not in name and _RETIRED not in name):
            continue
        dead = _dead_leftover(name)
        if dead is None:
            logger.warning("%s: left by an earlier, interrupted job; delete it if no job is running", path)
            continue
        if not dead:
            continue
        if _RETIRED in name:
            target = folder / name[1:].split(_RETIRED, 1)[0]
            inner = path / target.name
            if inner.exists() and not target.exists():
                os.replace(inner, target)
                logger.warning("%s: put back from %s (a job was killed while replacing it)", target, path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.info("Removed %s, left by a killed job", path)
        removed.append(path)
    return removed


def _atomic_target(path: Path):
    make_folder(path.parent)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=path.suffix)
    os.close(handle)
    return Path(temporary)


def write_atomically(path: os.PathLike | str, write: Callable[[Path], Any]) -> Path:
    """`write(temporary_path)` beside `path`, then rename into place: readers never see half a file.

    The file gets the mode the umask gives a new file (mkstemp's is 0600).
    """
    path = Path(path)
    temporary = _atomic_target(path)
    try:
        write(temporary)
        apply_umask(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def staging_folder(target: os.PathLike | str) -> Path:
    """An empty folder beside `target` to build it in, with the umask's mode; see `publish_folder`."""
    target = Path(target)
    make_folder(target.parent)
    clean_leftovers(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=temporary_prefix(target)))
    apply_umask(staging, directory=True)
    return staging


def publish_folder(staging: Path, target: Path) -> None:
    """Rename the finished `staging` folder to `target`, replacing an old `target` whole.

    The old folder is first renamed aside (`.<name>.old.*`); a kill between the two
    renames leaves it there, and the next `clean_leftovers` puts it back.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_RETIRED}{_owner_tag()}."))
    os.replace(target, retired / target.name)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(retired / target.name, target)  # Put the old folder back.
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class FolderKind:
    """What marks an output folder as one a job wrote, and as finished work that only --overwrite replaces.

    `markers`: entries any one of which makes a non-empty folder ours (anything else
    there is the user's, and the folder is refused whatever --overwrite says).
    `finished`: the entry whose presence marks finished work; a folder of ours
    without it holds unfinished work the job may resume.
    """

    noun: str  # "an export folder"
    markers: tuple
    finished: str
    holds: str  # "an export", as in "holds an export; pass --overwrite to replace it"


def check_output_folder(folder: os.PathLike | str, kind: FolderKind, overwrite: bool = False) -> bool:
    """May a job write `folder`? Refuse with one line, or return True when it holds unfinished work of ours.

    Changes nothing: a missing folder, an empty one, or one of ours (finished and
    `overwrite`, or unfinished) passes; a file in its place, a folder of someone
    else's, or finished work without `overwrite` is refused, as is a place that
    cannot be written.
    """
    folder = Path(folder)
    check_links(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder}: exists and is not a folder")
    check_writable(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return False
    if not any((folder / marker).exists() for marker in kind.markers):
        raise OutputExistsError(f"{folder}: not empty and not {kind.noun} (no {kind.markers[0]}); "
                                "choose another --output-dir")
    if (folder / kind.finished).exists():
        if not overwrite:
            raise OutputExistsError(f"{folder}: holds {kind.holds}; pass --overwrite to replace it")
        return False
    return True


@contextlib.contextmanager
def building(target: os.PathLike | str, marker: Optional[str] = None, finished: str = "") -> Iterator[Path]:
    """Build a folder under a temporary name beside `target`; on success publish it as `target` whole.

    `with folders.building(out) as staging: ...write into staging...` - if the
    block raises, the staging folder is removed and `target` is untouched.
    Re-check that `target` may be replaced inside the block, as its last step,
    when the job ran long enough for another to have written it meanwhile.
    With a `marker` file name, the marker (listing what the job wrote) is
    added, and an existing `target` keeps every entry the previous job did
    not write (`publish_entries`) instead of being replaced whole.
    """
    target = Path(target)
    staging = staging_folder(target)
    try:
        yield staging
        if marker is None:
            publish_folder(staging, target)
        else:
            entries = sorted(path.name for path in staging.iterdir())
            (staging / marker).write_text(marker_text("Written by mnist_keras; --overwrite replaces only "
                                                      "the entries below.", entries))
            apply_umask(staging / marker)
            publish_entries(staging, target, marker, finished)
    finally:
        shutil.rmtree(staging, ignore_errors=True)



def publish_entries(staging: Path, target: Path, marker: str, finished: str) -> None:
    """Move the finished `staging` folder's entries into `target` (a folder of ours, marked by `marker`),
    replacing the entries the previous job listed in its marker and leaving every other entry (the user's).

    `finished` (the entry marking finished work) goes first out and last in, so a kill in between leaves
    an unfinished folder of ours, never a finished one with parts missing.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    names = sorted(path.name for path in staging.iterdir())
    previous = (target / marker).read_text().splitlines()[1:] if (target / marker).is_file() else []
    remove_entries(target, [finished])
    remove_entries(target, sorted({*previous, *names} - {finished, marker}))
    for name in sorted(names, key=lambda name: (name == finished, name == marker)):
        os.replace(staging / name, target / name)


def marker_text(description: str, entries) -> str:
    """A marker file's content: one line saying what the folder is, then the entries the job wrote."""
    return description.rstrip("\n") + "\n" + "".join(f"{name}\n" for name in entries)
