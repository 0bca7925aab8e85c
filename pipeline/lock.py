"""An exclusive lock file for a folder that one process at a time may write (a run folder).

The lock is a small JSON file holding the host, the pid and when it was
taken, put in place by a hard link from a private file (which fails where the
name exists, as ``O_EXCL`` does, atomic on local file systems and NFS, and
never shows an empty lock). A lock left by a process that died on this host is *stale*: it is
named in a message and taken over. A lock held by a live process, or by a
process on another host (whose liveness cannot be checked from here), is
refused with a message naming it; the user deletes it once that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.atomic import fsync_path, process_alive
from pipeline.errors import LockedError


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""

    host: str
    pid: int
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"


def read_holder(path: Path) -> Holder | None:
    """The holder named in a lock file, or None when the file is gone or unreadable as a lock."""
    try:
        data = json.loads(path.read_text())
        return Holder(str(data["host"]), int(data["pid"]), str(data.get("since", "?")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder("?", -1, "?")  # not a lock we wrote: judged like another host's


class FolderLock:
    """``with FolderLock(folder / ".lock", what="run folder R"):`` holds the lock for the block.

    Raises:
        LockedError: on entering, when a live process (or one on another host) holds it.
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.held = False
        self._me: Holder | None = None

    def acquire(self) -> None:
        mine = Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        # the lock appears whole: written to a private file first, then hard-linked into place (a link, like
        # O_EXCL, fails where the name exists), so no reader ever finds it empty and judges it foreign
        private = self.path.with_name(f".{self.path.name}.{mine.host}.{mine.pid}")
        private.write_text(json.dumps({"host": mine.host, "pid": mine.pid, "since": mine.since}))
        fsync_path(private)
        try:
            self._take(mine, private)
        finally:
            private.unlink(missing_ok=True)

    def _take(self, mine: Holder, private: Path) -> None:
        for _ in range(3):  # a stale lock taken over, or one released between our reads
            try:
                os.link(private, self.path)
            except FileExistsError:
                holder = read_holder(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.host == mine.host and holder.pid == mine.pid:
                    raise LockedError(f"{self.what} is already locked by this process ({self.path})") from None
                if holder.host != mine.host or holder.pid < 0:
                    raise LockedError(
                        f"{self.what} is locked by {holder.describe()} ({self.path}); this host cannot tell "
                        "whether that process still runs: delete the file once it has stopped") from None
                if process_alive(holder.pid):
                    raise LockedError(f"{self.what} is in use by {holder.describe()} ({self.path})") from None
                print(f"warning: {self.what}: taking over the stale lock of {holder.describe()} (that process "
                      "is gone)", file=sys.stderr)
                self._remove_if(holder)
                continue
            fsync_path(self.path.parent)
            self.held, self._me = True, mine
            return
        raise LockedError(f"{self.what}: could not take the lock {self.path} (others keep taking it)")

    def _remove_if(self, holder: Holder) -> None:
        """Remove the lock file if it still names ``holder`` (another process may have taken it over)."""
        if read_holder(self.path) == holder:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.held and self._me is not None:
            self.held = False
            self._remove_if(self._me)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
