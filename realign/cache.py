"""The realign cache: where converted models and trained judges live, and how they are built once.

Concurrent processes (two stages started together, the workers of a pipeline) may all need the same cached
directory. `build_cached_dir` builds it under a file lock into a temporary sibling that is renamed into place only
when complete, so a killed build never leaves a half-written directory and two processes never build side by side.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX file locks: realign runs on Linux and macOS
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def cache_dir() -> Path:
    """Where realign keeps converted models and trained judges: ``$REALIGN_CACHE`` or ``~/.cache/realign``."""
    configured = os.environ.get("REALIGN_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "realign"


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the body; other processes wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build_cached_dir(target: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Return ``target``, building it first with ``build(temp_dir)`` unless ``is_complete(target)``."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        if is_complete(target):  # another process finished it while we waited
            return target
        if target.exists():  # left over from an interrupted manual copy: not usable
            shutil.rmtree(target)
        temp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        temp_dir.chmod(0o755)  # mkdtemp makes it private; the cached directory is an ordinary shared one
        try:
            build(temp_dir)
            os.replace(temp_dir, target)
        finally:
            if temp_dir.exists():
                shutil.rmtree(temp_dir, ignore_errors=True)
    return target
