"""Content-addressed artifact cache (DESIGN.md "Reuse").

An artifact's key hashes everything that changes it and nothing else. Artifacts are built in a
temporary directory next to their final place and renamed into place when complete, so a crash or
an interrupt never leaves anything that looks complete. Concurrent builders of the same key (grid
workers whose groups share a clean reference model) take turns on a lock file under ``.locks/``, so
the second finds the first one's artifact instead of training it again; where the file system has
no locks, both finish and the first rename wins. Dot-named entries are never artifacts, and
``defense-scratch/`` holds each defense's own cache and model views (:mod:`nlpbd.scratch`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "NLPBD_CACHE"
META_FILE = "artifact.json"
TMP_PREFIX = ".tmp-"
LOCKS_DIR = ".locks"  # one empty file per key ever built; never read as an artifact


def default_cache_root() -> Path:
    """``$NLPBD_CACHE``, else ``$XDG_CACHE_HOME/nlpbd``, else ``~/.cache/nlpbd``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nlpbd"


def open_cache(root: Path | None = None) -> ArtifactCache:
    """The artifact cache at ``root``, else the default one.

    A given ``root`` becomes the process's default too (``$NLPBD_CACHE``, inherited by its workers), so
    the models built or converted on first use (tiny-bert, SmolLM2's fp32 copy) land beside the
    artifacts and not in ``~/.cache``.
    """
    if root is not None:
        os.environ[CACHE_ENV] = str(Path(root).expanduser().resolve())
    return ArtifactCache(root)


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def content_key(payload: Any) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def temporary_sibling(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place (dot-named: never an artifact)."""
    return final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # someone else's complete copy is as good as ours
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def build_lock(lock_file: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_file``; the kernel releases it when the holder exits or dies.

    Yields whether the lock is held: False where the file system has no locks.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            locked = True
        except OSError:  # no locks on this file system (some network mounts): builds may then overlap
            locked = False
        yield locked


def sweep_abandoned_builds(final: Path) -> None:
    """Remove the temporary directories of builds of ``final`` whose process died (``kill -9``, power loss).

    Only safe while holding the key's build lock: then no live builder of this key owns one.
    """
    for tmp in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: readers see the old file or the new, never a part.

    The data goes to a dot-named sibling, is fsynced and renamed over ``path``, and the rename itself is
    persisted. A plain open(): the file gets the umask's mode (mkstemp's 0600 hid records from a group).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory``; not possible on every platform, where it is skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Artifact:
    path: Path
    meta: dict
    cached: bool


class ArtifactCache:
    """Artifacts under ``root/<kind>/<key>/`` with their metadata in ``artifact.json``."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_cache_root()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> Artifact | None:
        path = self.path(kind, key)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            return None
        return Artifact(path, json.loads(meta_file.read_text()), cached=True)

    def get_or_build(self, kind: str, payload: dict, build: Callable[[Path], dict]) -> Artifact:
        """The artifact for ``payload``; ``build(tmpdir)`` writes it and returns its metadata."""
        key = content_key(payload)
        found = self.lookup(kind, key)
        if found is not None:
            return found
        with build_lock(self.root / LOCKS_DIR / kind / f"{key}.lock") as exclusive:
            found = self.lookup(kind, key)  # built by someone else while we waited
            if found is not None:
                return found
            if exclusive:
                sweep_abandoned_builds(self.path(kind, key))
            with atomic_directory(self.path(kind, key)) as tmp:
                meta = {"kind": kind, "key": key, "payload": payload, **build(tmp)}
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return Artifact(self.path(kind, key), meta, cached=False)
