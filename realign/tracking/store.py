"""The tracking store: opened once (a fresh SQLite file is migrated under a lock), every call retried while its
error is transient (`store_call`), what still fails one line (`StoreError`); and the code version runs carry."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import time
from pathlib import Path


from realign.errors import RealignError
from realign.tracking.tags import DEFAULT_TRACKING_URI



def _mlflow():
    import mlflow

    return mlflow


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# -- transient store errors ------------------------------------------------------------------------------------
# Substrings of errors that a retry can cure: SQLite busy with another writer, a server restarting or overloaded,
# a connection dropped, and the UNIQUE race of two idempotent writes (the same tag or dataset row) at once.
TRANSIENT_ERRORS = ("database is locked", "database table is locked", "unique constraint failed",
                    "connection refused", "connection reset", "connection aborted", "remotedisconnected",
                    "max retries exceeded", "temporarily unavailable", "too many 5", "read timed out",
                    "502", "503", "504", "bad gateway", "service unavailable", "gateway time")


# Retries stop once this much time has passed (REALIGN_STORE_WAIT_S overrides both). A server answers or not
# within seconds; a SQLite file shared by several busy processes (MLflow waits up to 20 s per locked attempt)
# gets a minute before the user is told.
RETRY_BUDGET_S = 8.0
SQLITE_RETRY_BUDGET_S = 60.0


def retry_budget_s() -> float:
    if os.environ.get("REALIGN_STORE_WAIT_S"):
        return float(os.environ["REALIGN_STORE_WAIT_S"])
    return SQLITE_RETRY_BUDGET_S if tracking_uri().startswith("sqlite:") else RETRY_BUDGET_S


def is_transient(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(fragment in text for fragment in TRANSIENT_ERRORS)


def is_store_failure(err: BaseException) -> bool:
    """Whether `err` comes from the tracking store being unusable (not from a mistake in the call)."""
    if is_transient(err):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"OperationalError", "ConnectionError", "Timeout", "ChunkedEncodingError"}:
        return True
    return getattr(err, "error_code", "") in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "ENDPOINT_NOT_FOUND")


class StoreError(RealignError):
    """The tracking store kept failing (or cannot be used at all): one line naming the store and the fix."""


def store_call(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` against the tracking store, retried with jittered backoff while the error is transient.

    What still fails after the retry budget becomes a StoreError (one line, exit status 2 from the CLI).
    """
    deadline = time.monotonic() + retry_budget_s()
    delay = 0.1
    while True:
        try:
            return fn(*args, **kwargs)
        except RealignError:
            raise
        except Exception as err:
            if not is_transient(err):
                raise
            if time.monotonic() + delay > deadline:
                raise store_error(err) from None
        time.sleep(delay * (0.5 + random.random()))
        delay = min(2 * delay, 1.6)


def store_error(err: BaseException) -> StoreError:
    uri = tracking_uri()
    if "locked" in str(err).lower():
        return StoreError(f"tracking store {uri} stayed locked by another process ({_one_line(err)[:160]})",
                          "wait for the other process, or give each concurrent job a tracking server "
                          "(mlflow server) instead of one SQLite file")
    return StoreError(f"tracking store {uri} is not answering ({_one_line(err)[:160]})",
                      "start the server, or set MLFLOW_TRACKING_URI to a reachable server or a sqlite:/// path")


class _RetryingClient:
    """An MlflowClient whose every method call goes through `store_call`."""

    def __init__(self) -> None:
        self._client = store_call(_mlflow().MlflowClient)  # creating it may open (and migrate) the store

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        return functools.partial(store_call, attr) if callable(attr) else attr


def client() -> _RetryingClient:
    return _RetryingClient()


# -- the store, opened once --------------------------------------------------------------------------------------
_OPENED: set[str] = set()


def open_store() -> None:
    """Point MLflow at the configured store and prove it answers, before any work starts.

    A fresh SQLite file is created and migrated by one process at a time (a lock file beside it): several
    processes that open a new store at once would otherwise all run its schema migration and fail. The file is
    put in write-ahead-log mode (`use_wal`), so that processes reading it never block the one writing.
    """
    mlflow = _mlflow()
    uri = tracking_uri()
    # MLflow's own HTTP retries wait minutes on a dead server; store_call's few seconds decide instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(uri)
    if uri in _OPENED:
        return
    lock = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        folder = db_path.parent
        if not folder.is_dir():
            raise StoreError(f"tracking store {uri} is not writable: folder {folder} does not exist",
                             "create the folder, or set MLFLOW_TRACKING_URI to a writable sqlite:/// path "
                             "or a tracking server http://host:5000")
        if not os.access(folder, os.W_OK) or (db_path.exists() and not os.access(db_path, os.W_OK)):
            raise StoreError(f"tracking store {uri} is not writable",
                             "set MLFLOW_TRACKING_URI to a writable sqlite:/// path or a tracking server "
                             "http://host:5000")
        from realign.cache import exclusive_lock

        lock = exclusive_lock(db_path.with_name(db_path.name + ".lock"))
    with lock:
        try:
            client().search_experiments(max_results=1)  # creates and migrates a new store
        except RealignError:
            raise
        except Exception as err:  # not transient: a broken db, a wrong URL, a server that is no MLflow
            raise StoreError(f"cannot open tracking store {uri}: {_one_line(err)[:200]}",
                             "set MLFLOW_TRACKING_URI to a writable sqlite:/// path or a running mlflow server") \
                from None
        if uri.startswith("sqlite:///"):
            use_wal(Path(uri[len("sqlite:///"):]))
    _OPENED.add(uri)


def use_wal(db_path: Path) -> None:
    """Switch a SQLite file to write-ahead logging (persistent, a no-op when it already is).

    In SQLite's default rollback-journal mode every reader blocks the writer: side-by-side runs, a search's
    trials and anyone polling the store take turns and, on a loaded machine, time out with "database is locked".
    In WAL mode readers and the one writer proceed together. WAL needs a local disk (not NFS); a team sharing a
    store across machines uses a tracking server (scripts/server.sh) instead. Another process holding the file
    may keep the switch from happening now; the next process to open the store makes it.
    """
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(db_path, timeout=5)) as connection:
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:
        pass


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]


def note(line: str) -> None:
    """One line for the user on stderr (never stdout: the CLI's last stdout line is the run id)."""
    print(line, file=sys.stderr, flush=True)


_CODE_VERSION: str | None = None


def code_version() -> str:
    """A hash of realign's own source and presets (realign/**/*.py, conf/**/*.yaml): equal hashes, same code.

    Not the git commit: an installed package has none, and a checkout with local edits would share one.
    """
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import hashlib

        import realign
        from realign.config import conf_dir

        digest = hashlib.sha256()
        package = Path(realign.__file__).parent
        files = [(f"realign/{p.relative_to(package)}", p) for p in package.rglob("*.py")]
        files += [(f"conf/{p.relative_to(conf_dir())}", p) for p in conf_dir().rglob("*.yaml")]
        for name, path in sorted(files):
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE_VERSION = digest.hexdigest()[:16]
    return _CODE_VERSION
