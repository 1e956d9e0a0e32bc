"""twistd entry point: `twistd -n transferd [--config FILE] [--endpoint SPEC] [--wait-for-backends SECONDS]`."""

import os
import signal
import sys

from twisted.logger import Logger
from twisted.python import usage

from transferd import wiring
from transferd.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--config FILE] [--endpoint SPEC] [--wait-for-backends SECONDS]"
    longdesc = (
        "Run transferd. Without --config it runs on its embedded defaults: SQLite and the "
        "local stager under ./transferd-data, an in-process queue, the local mover, "
        "listening on 127.0.0.1:8080. conf/transferd.ini documents every setting."
    )
    optParameters = [
        ["config", "c", None, "INI configuration file (see conf/transferd.ini)"],
        ["endpoint", "e", None, "listen on this Twisted endpoint, overriding [api] endpoint"],
        ["wait-for-backends", None, None, "seconds start-up waits for the database and RabbitMQ to come up, "
                                          "overriding [startup] wait_for_backends"],
    ]

    def postOptions(self):
        overrides = {}
        if self["endpoint"]:
            overrides[("api", "endpoint")] = self["endpoint"]
        if self["wait-for-backends"] is not None:
            overrides[("startup", "wait_for_backends")] = self["wait-for-backends"]
        try:
            self.settings = load_config(self["config"], overrides)
        except ConfigError as error:
            # One line, not twistd's help text: the command line was fine, the configuration is not.
            raise SystemExit(f"transferd: {error}") from None


def makeService(options):
    """The daemon from transferd.wiring, plus what only twistd needs: exit codes and signals."""
    from twisted.internet import reactor

    try:
        daemon = wiring.build(options.settings, reactor)
    except ConfigError as error:
        raise SystemExit(f"transferd: {error}") from None
    daemon.started.addErrback(_failed_to_start, reactor)
    reactor.callWhenRunning(signal.signal, signal.SIGHUP, _sighup_handler(reactor))
    return daemon


def _sighup_handler(reactor):
    log = Logger()

    def handle(signum, frame):
        """SIGHUP would kill the daemon by default (a closed terminal, a careless reload)."""
        reactor.callFromThread(log.info, "SIGHUP ignored: restart transferd to apply configuration changes")

    return handle


def _failed_to_start(failure, reactor):
    """Log why, then stop; twistd itself would exit 0, so exit 1 once the reactor has stopped."""
    Logger().critical("transferd cannot start: {error}", error=failure.getErrorMessage())
    if reactor.running:
        reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        reactor.stop()


def _exit_failed():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
