"""The audit trail: one record per submission, cancel and refused request.

Each record says who (identity, or null when unauthenticated), from where
(peer address), what (action, job id) and the outcome (HTTP status and
message).  With [auth] audit_log set, records are JSON lines appended to
that file (flushed per line, so a crash loses none; reopened by path when
logrotate moves it); otherwise they go to the daemon's log under the
namespace "transferd.audit".
"""

import json
import os
from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.logger import Logger


class AuditLog(Service):
    """The audit trail's writer; a service so that the daemon closes the file when it stops."""

    log = Logger(namespace="transferd.audit")

    def __init__(self, path=None):
        """Opens path at once, so that an unwritable audit log stops start-up (OSError)."""
        self.path = path
        self._file = None
        self._inode = None
        if path is not None:
            self._open()

    def record(self, action, code, identity, peer, job_id=None, msg=None):
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "action": action,
            "outcome": code,
            "identity": identity,
            "peer": peer,
            "job_id": job_id,
            "msg": msg,
        }
        if self.path is None:
            self.log.info("audit {audit}", audit=json.dumps(entry))
            return
        self._open().write(json.dumps(entry) + "\n")
        self._file.flush()

    def _open(self):
        """The file at self.path, reopened when it was moved or removed (log rotation)."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if self._file is None or inode != self._inode:
            if self._file is not None:
                self._file.close()
            self._file = open(self.path, "a", encoding="utf-8")
            self._inode = os.fstat(self._file.fileno()).st_ino
        return self._file

    def stopService(self):
        super().stopService()
        if self._file is not None:
            self._file.close()
            self._file = None
