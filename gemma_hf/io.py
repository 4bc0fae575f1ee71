"""Atomic directory writes (a run, checkpoint or export either exists complete or not at all), the
exclusive lock of a directory, and the streamed sha256 of a file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError
from .rundir import MARKER, RUN_JSON


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success rename it to `final`, on error delete it.

    The temporary directory lives in the same parent, so the final `os.replace` is a rename on
    one filesystem: a process killed mid-write leaves only a `.tmp-*` directory, never a
    `final` that looks complete. With `overwrite=True` an existing `final` is replaced (moved
    aside first, deleted after the rename) if it is one this package may replace (see
    :func:`existing_output_refusal`); otherwise an existing `final` is an error.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    refusal = existing_output_refusal(final, overwrite, "overwrite=True")
    if refusal:
        raise FileExistsError(refusal)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The files that make a directory a model directory (what save_pretrained, a merge or an export writes).
_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# Files that make a directory a gemma-hf run: never replaced by an overwrite.
_RUN_FILES = (RUN_JSON, MARKER)


def replace_refusal(path: str | os.PathLike) -> str | None:
    """Why the existing ``path`` must not be replaced by an overwrite, or None when it may be.

    An overwrite only ever replaces what this package writes as an output: an empty directory or a
    model directory (``config.json`` and safetensors weights). A file, a directory holding anything
    else (the user's own files) and a training run directory are refused: deleting them would lose
    data that no command of this package can give back.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} exists and is not a directory"
    names = sorted(p.name for p in path.iterdir())
    if any(name in names for name in _RUN_FILES):
        return (f"{path} is a gemma-hf run directory (it holds {RUN_JSON if RUN_JSON in names else 'a run marker'}); "
                "a run is never replaced")
    if not names or ("config.json" in names and any(name in names for name in _MODEL_WEIGHTS)):
        return None
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{path} holds files that are not a model directory ({shown})"


def existing_output_refusal(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> str | None:
    """The message refusing to write the output ``path``, or None when it may be written.

    A missing ``path`` may always be written. An existing one only with ``overwrite`` and only when
    :func:`replace_refusal` allows it; the hint to pass ``flag`` is given only where it would work.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    reason = replace_refusal(path)
    if reason is None:
        return None if overwrite else f"{path} already exists; pass {flag} to replace it."
    return (f"{reason}: {'even with ' + flag + ', ' if overwrite else ''}it is not replaced (only an empty "
            "directory or a model directory is). Choose another output, or move what is there yourself.")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks: memory does not grow with the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DirectoryBusy(InputError):
    """Another live process holds the lock of a directory."""


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str = "directory") -> Iterator[Path]:
    """Hold an exclusive lock on ``target`` (a directory that may not exist yet) for the block.

    The lock is ``fcntl.flock`` on the sibling ``.{name}.lock``: the kernel releases it when the
    holder dies, so a killed run never leaves a stale lock behind, and a second process gets
    :class:`DirectoryBusy` at once (naming the holder's pid) instead of interleaving its writes.
    The lock file is removed on exit; a process that opened it just before the removal notices
    (different inode) and takes the lock on the new file.
    """
    import fcntl

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryBusy(f"{target} is in use by another gemma-hf process (pid {holder}); two runs must not "
                                f"write one {what}. Wait for it to finish, or choose another {what}.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file that was removed meanwhile: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
