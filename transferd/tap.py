"""twistd entry point: `twistd -n transferd [--config FILE] [--endpoint SPEC] [--wait-for-backends SECONDS]`."""

import os
import signal
import sys

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from transferd import logs, wiring
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
        self.overrides = overrides  # SIGHUP reads the file again with the same overrides
        try:
            self.settings = load_config(self["config"], overrides)
        except ConfigError as error:
            # One line, not twistd's help text: the command line was fine, the configuration is not.
            raise SystemExit(f"transferd: {error}") from None


class TwistdService(MultiService):
    """What twistd runs: the daemon, and the log observer for twistd's Application.

    twistd builds its Application, adds this service to it, and only then
    starts its logger, which uses the Application's ILogObserver component
    when it has one (transferd.logs): the JSON observer of [log] format =
    json, or twistd's own text observer, either filtered by [log] level.
    """

    def __init__(self, daemon, log_observer=None):
        super().__init__()
        self.daemon = daemon
        self.log_observer = log_observer
        daemon.setServiceParent(self)

    def setServiceParent(self, parent):
        if self.log_observer is not None:
            parent.setComponent(ILogObserver, self.log_observer)  # parent: twistd's Application (Componentized)
        super().setServiceParent(parent)


def makeService(options):
    """The daemon from transferd.wiring, plus what only twistd needs: the log format, exit codes and signals."""
    from twisted.internet import reactor

    observer = None
    if options.settings.log.format == "json":
        try:
            observer = logs.twistd_observer(options.parent or {})
        except (ValueError, OSError) as error:
            raise SystemExit(f"transferd: [log] format = json: {error}") from None
    elif options.parent is not None:  # twistd's own text log, so that [log] level can filter it
        observer = logs.twistd_text_observer(options.parent)
    levels = logs.LogLevelControl(options.settings.log.level)
    try:
        daemon = wiring.build(options.settings, reactor)
    except ConfigError as error:
        raise SystemExit(f"transferd: {error}") from None
    daemon.log_levels = levels  # IReconfigurable: SIGHUP changes [log] level
    daemon.started.addErrback(_failed_to_start, reactor)
    reactor.callWhenRunning(_install_signals, reactor, options, daemon)
    return TwistdService(daemon, levels.observer(observer) if observer is not None else None)


def _install_signals(reactor, options, daemon):
    """SIGHUP reloads the configuration (it would kill the daemon by default); SIGUSR2 drains the daemon."""
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload, options, daemon))
    signal.signal(signal.SIGUSR2, lambda signum, frame: reactor.callFromThread(daemon.fleet.request_drain, True))


def reload(options, daemon):
    """Read the configuration file again (with the same command-line overrides) and apply it (Daemon.reload).

    A file that cannot be read or fails its checks changes nothing: one line says why.
    """
    log = Logger(namespace="transferd.tap")
    if options["config"] is None:
        log.info("SIGHUP: no configuration file to read again (transferd runs on its defaults, without --config)")
        return False
    log.info("SIGHUP: reading {path} again", path=options["config"])
    try:
        config = load_config(options["config"], options.overrides)
    except ConfigError as error:
        log.error("configuration not reloaded, nothing changed: {error}", error=error)
        return False
    return daemon.reload(config)


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
