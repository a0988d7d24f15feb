"""File primitives: one atomic-write policy for every file distill_lr writes, the background writer, disk space.

Every file is written under a unique temporary name in its folder, flushed to disk, then renamed
into place, so a file that exists under its final name is complete, whatever crashed and when.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import struct
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from distill_lr.checkpoint.layout import LOCK_NAME
from distill_lr.errors import UserInputError

try:
    import fcntl
except ImportError:  # Windows: no flock; a run there works without the lock, with a warning
    fcntl = None  # type: ignore[assignment]


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A unique temporary path beside ``path`` to write to; on success it is fsynced and renamed to ``path``, on error removed.

    Unique, so two runs that share a folder (a teacher cache) never write to one temporary file.
    """
    tmp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:12]}.tmp")  # created by its writer, with the usual permissions
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only folder fails the unlink too: the first error is the one to see
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """``atomic_file`` opened for writing: for callers that write a file piece by piece."""
    with atomic_file(path) as tmp, tmp.open("wb") as fh:
        yield fh
        fh.flush()


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_WRITE_CHUNK = 1 << 24  # bytes per write: no second full copy of a large tensor


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically (see ``atomic_file``); returns the sha256 of its bytes, taken as they are written.

    The file is laid out as the safetensors format specifies (an 8-byte header length, the JSON header
    padded to 8 bytes, the tensors' bytes in name order), so the hash needs no second read of the file.
    """
    host = {name: t.detach().contiguous().cpu() for name, t in sorted(tensors.items())}
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in host.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with atomic_writer(path) as fh:
        for block in (struct.pack("<Q", len(raw)), raw):
            fh.write(block)
            digest.update(block)
        for t in host.values():
            data = t.reshape(-1).view(torch.uint8).numpy()
            for start in range(0, len(data), _WRITE_CHUNK):
                block = memoryview(data[start : start + _WRITE_CHUNK])
                fh.write(block)
                digest.update(block)
    return digest.hexdigest()


def write_json_atomic(obj: Any, path: Path) -> None:
    with atomic_writer(path) as fh:
        fh.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (0 when it does not exist): what a resumed run has already written."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0


def check_disk_space(needs: dict[Path, int]) -> None:
    """Refuse to start when a file system lacks room for what the run will still write to these folders (bytes)."""
    per_fs: dict[int, list[Any]] = {}  # file system -> [a folder on it, bytes]
    for folder, size in needs.items():
        anchor = next(p for p in (folder, *folder.parents) if p.exists())
        per_fs.setdefault(anchor.stat().st_dev, [anchor, 0])[1] += max(size, 0)
    for anchor, size in per_fs.values():
        free = shutil.disk_usage(anchor).free
        if size > free:
            raise UserInputError(
                f"not enough disk space at {anchor}: this run writes about {human_bytes(size)} there (compressed checkpoint,"
                f" on-disk activation caches, teacher cache), {human_bytes(free)} is free: free some space or choose another"
                " output= (or cache_dir=, cache=host, teacher_cache=)"
            )


def human_bytes(n: float) -> str:
    """A size in the unit that shows it: ``812 B``, ``3.4 MiB``, ``1.25 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError  # the loop returns at GiB


def check_apart(folder: Path, role: str, others: dict[str, Path | None]) -> None:
    """Refuse ``folder`` when it is, contains or lies inside one of ``others`` (by what they are: "the input model"...)."""
    mine = folder.expanduser().resolve()
    for what, other in others.items():
        if other is None:
            continue
        theirs = other.expanduser().resolve()
        relation = "is" if mine == theirs else "lies inside" if theirs in mine.parents else "contains" if mine in theirs.parents else None
        if relation is not None:
            raise UserInputError(f"{role} {folder} {relation} {what} ({other}): choose another {role}, apart from it")


def check_folder_path(folder: Path, role: str) -> None:
    """Refuse a ``folder`` that is a file, or lies below one, before anything is read or written."""
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{role} {folder} is a file, not a folder: give a folder path (a new or empty folder)")
    blocked = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserInputError(f"{role} {folder} cannot be created: {blocked} is a file, not a folder; give another path")


@contextmanager
def claimed_folder(folder: Path, role: str = "output folder") -> Iterator[Path]:
    """Create ``folder`` if needed and hold an exclusive lock on it (``LOCK_NAME``) until the block ends.

    A second run on the same folder is refused in one line naming the first. On the way out the lock
    file goes, and so do the folders this call created when they are still empty: a refused run leaves
    the disk as it found it.
    """
    check_folder_path(folder, role)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(folder, role)
    except OSError as err:
        _remove_empty(created)
        raise UserInputError(f"cannot write to {role} {folder} ({err.strerror}): choose a folder you can write to") from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink()  # still ours: nobody else can hold it, and a waiting run re-checks the inode
        os.close(lock)
        _remove_empty(created)


def _take_lock(folder: Path, role: str) -> int:
    """An open descriptor of ``folder/LOCK_NAME`` holding its ``flock``, with this process named in the file."""
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock on this system")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "a process that has not yet named itself"
            os.close(fd)
            raise UserInputError(
                f"{role} {folder} is in use by another distill_lr run ({holder}): wait for it to end or stop it, or choose another folder"
            ) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            warnings.warn(
                f"{role} {folder} is on a file system without locks ({err.strerror}): a second run on it would not be refused", stacklevel=4
            )
            break
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_empty(folders: list[Path]) -> None:
    """Remove the given folders, deepest first, as long as they are empty (what a refused run created)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class BackgroundWriter:
    """Writes finished layers on one worker thread, in order, while the next layer computes.

    ``drain()`` before queueing the next layer's writes keeps at most one layer in flight (host
    memory), and re-raises a failed write in the main thread. Call ``close()`` on every exit path, so
    a layer that was finished before a crash is on disk and in the manifest. ``discard``: jobs are dropped (a
    process beside the one that writes, ``distill_lr.distributed``).
    """

    def __init__(self, discard: bool = False) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill_lr-writer")
        self._pending: list[Future[None]] = []
        self.discard = discard

    def submit(self, job: Callable[[], None]) -> None:
        if self.discard:
            return
        earlier = list(self._pending)

        def guarded() -> None:
            if not any(f.exception() is not None for f in earlier):  # nothing is written after a failed write
                job()

        self._pending.append(self._pool.submit(guarded))

    def drain(self) -> None:
        """Wait for every queued write."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown()
