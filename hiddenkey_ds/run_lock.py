"""One writer per run directory: a training (rank 0, from its start-up checks to its end) or an evaluation holds
RUN_DIR/run.lock while it writes, and a second writer is refused with a message that names the holder.

The lock is filelock's SoftFileLock: a marker file created exclusively (this works on the shared file systems of
a cluster, where flock often does not). The marker records the holder's pid, host and process start; filelock
clears a marker whose holder is gone (same host, that process no longer running) by itself. A holder on another
host cannot be checked from here, so its lock is only reported, with how to remove it. Beside the marker,
run.lock.json says who holds it in words (host, pid, command, start time).

A foundation module: it imports only errors and run_dir, so every layer may use it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.run_dir import LOCK, LOCK_HOLDER, write_atomic


class RunDirLocked(RecipeError):
    """Another live process writes the run directory (a RecipeError: entry points report it and exit 2)."""


def _holder(run_dir: Path) -> dict:
    """Who holds the lock: filelock's marker (pid, host) is the truth, run.lock.json adds the words. A holder
    file left by an earlier holder (of a lock filelock has since reclaimed) is ignored."""
    marker: dict = {}
    try:
        lines = (run_dir / LOCK).read_text().splitlines()
        fields = dict(line.split("=", 1) for line in lines if "=" in line)  # filelock's key=value marker format
        pid, host = (fields.get("pid"), fields.get("host")) if fields else (lines[0], lines[1])
        marker = {"pid": int(pid), "host": host}
    except (OSError, ValueError, IndexError):
        pass
    try:
        info = json.loads((run_dir / LOCK_HOLDER).read_text())
    except (OSError, ValueError):
        return marker
    if marker and (info.get("pid"), info.get("host")) != (marker["pid"], marker["host"]):
        return marker
    return info


def describe_holder(run_dir: str | os.PathLike) -> str:
    info = _holder(Path(run_dir))
    if not info:
        return "another process (it has not recorded itself yet)"
    what = info.get("what") or "a process"
    started = f", since {info['started']}" if info.get("started") else ""
    command = f": {info['command']}" if info.get("command") else ""
    return f"{what} (pid {info.get('pid', '?')} on host {info.get('host', '?')}{started}){command}"


def _refusal(run_dir: Path, key: str, hint: str) -> str:
    info = _holder(run_dir)
    lock = run_dir / LOCK
    elsewhere = info.get("host") not in (None, socket.gethostname())
    stale_hint = (f"; if that process no longer runs on {info['host']}, delete {lock} and retry" if elsewhere
                  else "")
    return (f"{key}: {run_dir} is being written by {describe_holder(run_dir)} (hint: {hint}{stale_hint}; "
            "nothing was touched)")


TRAIN_KEY, TRAIN_HINT = "run.output_dir", "wait for it to finish, or choose another run.output_dir"


class RunLock:
    """The exclusive lock on one run directory. `acquire` creates the directory if needed (and `release` removes
    it again when it is still empty, so a refused or failed start leaves nothing behind)."""

    def __init__(self, run_dir: str | os.PathLike, what: str) -> None:
        self.run_dir = Path(run_dir)
        self.what = what  # "hiddenkey-ds train", "hiddenkey-ds eval": the holder's name in a refusal
        self._lock = None
        self._created: Path | None = None  # the outermost directory acquire created

    def check(self, key: str = TRAIN_KEY, hint: str = TRAIN_HINT) -> None:
        """Without touching anything: raise RunDirLocked naming the holder if a live process holds the lock (one
        whose holder is gone from this host does not count: acquire clears it)."""
        if not (self.run_dir / LOCK).exists():
            return
        info = _holder(self.run_dir)
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
            return
        raise RunDirLocked([_refusal(self.run_dir, key, hint)])

    def acquire(self, key: str = TRAIN_KEY, hint: str = TRAIN_HINT) -> None:
        """Take the lock or raise RunDirLocked naming the holder; `key` and `hint` word the message."""
        from filelock import SoftFileLock, Timeout

        missing = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
        if missing:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._created = missing[-1]
        lock = SoftFileLock(self.run_dir / LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            message = _refusal(self.run_dir, key, hint)
            self._remove_dir_if_empty()
            raise RunDirLocked([message]) from None
        self._lock = lock
        holder = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}
        try:
            write_atomic(self.run_dir / LOCK_HOLDER, json.dumps(holder, indent=2) + "\n")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Idempotent; the holder file goes first, so a new holder's file is never deleted."""
        if self._lock is None:
            return
        lock, self._lock = self._lock, None
        (self.run_dir / LOCK_HOLDER).unlink(missing_ok=True)
        lock.release()
        self._remove_dir_if_empty()

    def _remove_dir_if_empty(self) -> None:
        if self._created is None:
            return
        for directory in (self.run_dir, *self.run_dir.parents):
            try:
                directory.rmdir()
            except OSError:  # the run wrote something: it stays
                break
            if directory == self._created:
                break
        self._created = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
