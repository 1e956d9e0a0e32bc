"""The daemon's log as JSON lines ([log] format = json), for central log collection.

Each event becomes one JSON object on one line: time (ISO 8601, UTC),
level, namespace, message (the event's text, as the text log shows it),
then every field the event carries (job_id, error, ...) as a key of its
own, and for a failure its traceback.  Values that are not JSON become
their text.

Under twistd the observer must be chosen before twistd's logger starts:
twistd uses the ILogObserver component of its Application when there is one
(twisted.application.app.AppLogger.start), so transferd.tap hands it ours
(TwistdService).  It writes where twistd's text log would go: the --logfile
file (rotated like twistd's, SIGUSR1 included), or standard output with -n
and no --logfile (or --logfile=-).
"""

import json
import signal
import sys
from datetime import datetime, timezone

from twisted.logger import FilteringLogObserver, ILogObserver, LogLevel, PredicateResult, formatEvent
from twisted.python import logfile
from zope.interface import implementer

from transferd.interfaces import IReconfigurable

# Keys of twistd's and of the legacy log system's own, never copied as fields.
_INTERNAL = frozenset({"message", "format", "isError", "system", "time", "why", "failure", "printed"})


def event_fields(event):
    """The event as a JSON-able dict (see the module docstring)."""
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": level.name if level is not None else ("error" if event.get("isError") else "info"),
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL or key in record:
            continue
        record[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as one JSON line to a file object, flushed at once."""

    def __init__(self, out):
        self.out = out

    def __call__(self, event):
        try:
            line = json.dumps(event_fields(event), ensure_ascii=False, default=str)
        except Exception as error:  # a log line is never worth a crash
            line = json.dumps({"level": "error", "namespace": __name__, "message": f"unloggable event: {error}"})
        self.out.write(line + "\n")
        self.out.flush()


def twistd_observer(server_options):
    """The JSON observer writing where twistd (given server_options, its ServerOptions) would write its text log.

    Raises ValueError for a twistd option the JSON log cannot follow (--syslog).
    """
    if server_options.get("syslog"):
        raise ValueError("JSON lines go to --logfile or standard output, not to syslog: drop --syslog")
    name = server_options.get("logfile") or ""
    nodaemon = server_options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            raise ValueError("a daemon cannot log to standard output: give --logfile, or run with -n")
        return JSONLineObserver(sys.stdout)  # the real one: twistd replaces sys.stdout once logging begins
    out = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):  # as twistd's own file log: SIGUSR1 rotates it
        def rotate(signum, frame):
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return JSONLineObserver(out)


@implementer(IReconfigurable)
class LogLevelControl:
    """[log] level: the least severe events the daemon's log keeps; SIGHUP may change it (IReconfigurable).

    observer(inner) wraps the observer that writes (the JSON one, or
    twistd's own text log); events without a level (the legacy log's) pass.
    """

    def __init__(self, level="info"):
        self.level = LogLevel.levelWithName(level)

    def observer(self, inner):
        return FilteringLogObserver(inner, [self._predicate])

    def _predicate(self, event):
        level = event.get("log_level")
        return PredicateResult.no if level is not None and level < self.level else PredicateResult.maybe

    def reconfigure(self, config):
        self.level = LogLevel.levelWithName(config.log.level)


def twistd_text_observer(server_options):
    """The text log observer twistd itself would make from its options (file, rotation, syslog, stdout)."""
    from twisted.scripts.twistd import _SomeApplicationRunner

    return _SomeApplicationRunner.loggerFactory(server_options)._getLogObserver()
