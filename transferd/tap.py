"""twistd entry point: `twistd -n transferd [--config FILE] [--endpoint SPEC]`."""

import importlib
import os
import signal
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from transferd.api import TransferAPI
from transferd.config import ConfigError, load_config
from transferd.pipeline import Pipeline, Reconciler
from transferd.queue import open_queue
from transferd.store import open_store
from transferd.web import LimitedSite


class Options(usage.Options):
    synopsis = "[--config FILE] [--endpoint SPEC]"
    longdesc = (
        "Run transferd. Without --config it runs on its embedded defaults: SQLite and the "
        "local stager under ./transferd-data, an in-process queue, the local mover, "
        "listening on 127.0.0.1:8080. conf/transferd.ini documents every setting."
    )
    optParameters = [
        ["config", "c", None, "INI configuration file (see conf/transferd.ini)"],
        ["endpoint", "e", None, "listen on this Twisted endpoint, overriding [api] endpoint"],
    ]

    def postOptions(self):
        overrides = {}
        if self["endpoint"]:
            overrides[("api", "endpoint")] = self["endpoint"]
        try:
            self.settings = load_config(self["config"], overrides)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


def makeService(options):
    from twisted.internet import reactor

    try:
        return TransferdService.from_config(options.settings, reactor)
    except ConfigError as error:
        raise SystemExit(f"transferd: {error}") from None


# Backend name -> module providing from_config(config, clock, store).
STAGERS = {
    "local": "transferd.stagers.local",
    "callback": "transferd.stagers.callback",
    "taperest": "transferd.stagers.taperest",
}
MOVERS = {
    "local": "transferd.movers.local",
    "fts": "transferd.movers.fts",
}


def build_stager(config, clock, store):
    return importlib.import_module(STAGERS[config.stager.backend]).from_config(config, clock, store)


def build_mover(config, clock, store):
    mover = importlib.import_module(MOVERS[config.transfer.backend]).from_config(config, clock, store)
    unsupported = set(config.transfer.allowed_schemes) - mover.schemes
    if unsupported:
        raise ConfigError(
            f"[transfer] allowed_schemes lists {', '.join(sorted(unsupported))}, which the "
            f"{config.transfer.backend} mover cannot write (it can: {', '.join(sorted(mover.schemes))})"
        )
    return mover


def _exit_failed():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class TransferdService(service.MultiService):
    """The whole daemon: migrates the store, then starts queue, workers, API and timers."""

    log = Logger()

    def __init__(self, config, reactor, store, queue, stager, mover):
        super().__init__()
        self.reactor = reactor
        self.store, self.queue, self.stager, self.mover = store, queue, stager, mover
        self.pipeline = Pipeline(
            store, queue, stager, mover, reactor,
            prefetch=config.queue.prefetch,
            stage_prefetch=max(config.queue.prefetch, getattr(stager, "bulk_size", 0)),
            lease=config.reconciler.lease,
            requeue_after=config.reconciler.requeue_after,
        )
        self.reconciler = Reconciler(store, self.pipeline, queued_lost=config.queue.url.startswith("memory:"))
        self.api = TransferAPI(
            store, self.pipeline, stager, reactor,
            allowed_schemes=config.transfer.allowed_schemes,
            file_roots=config.transfer.file_roots,
            max_body_bytes=config.api.max_body_bytes,
        )
        try:
            endpoint = serverFromString(reactor, config.api.endpoint)
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError(f"bad value for [api] endpoint = {config.api.endpoint!r}: {error}") from None
        self.http = StreamServerEndpointService(
            endpoint, LimitedSite(self.api.resource(), config.api.max_body_bytes, access_log=config.api.access_log)
        )
        self.reconcile_timer = TimerService(config.reconciler.interval, self.reconciler.run_once)
        self.reconcile_timer.clock = reactor
        for child in (queue, self.pipeline, self.http, self.reconcile_timer):
            child.setServiceParent(self)
        # Backends that poll (Tape REST, FTS3) bring their own timers.
        for backend in (stager, mover):
            for child in getattr(backend, "services", lambda pipeline: [])(self.pipeline):
                child.setServiceParent(self)
        self.ready = defer.Deferred()  # fires once everything is started
        self._children_started = False

    @classmethod
    def from_config(cls, config, reactor):
        store = open_store(config.database.url, reactor)
        queue = open_queue(config.queue.url, reactor, max_deliveries=config.queue.max_deliveries)
        stager = build_stager(config, reactor, store)
        mover = build_mover(config, reactor, store)
        return cls(config, reactor, store, queue, stager, mover)

    def privilegedStartService(self):
        """Listen only once the schema is ready (startService), never before."""

    def startService(self):
        # Children start only once the schema is known to be right.
        service.Service.startService(self)
        signal.signal(signal.SIGHUP, self._sighup)
        d = self.store.migrate()
        d.addCallback(lambda _: self._start_children())
        d.addCallbacks(self.ready.callback, self._failed_to_start)

    def _sighup(self, signum, frame):
        """SIGHUP would kill the daemon by default (a closed terminal, a careless reload)."""
        self.reactor.callFromThread(
            self.log.info, "SIGHUP ignored: restart transferd to apply configuration changes"
        )

    def _start_children(self):
        self._children_started = True
        for child in self:
            child.startService()
        self.http._waitingForPort.addErrback(self._failed_to_start)
        self.log.info("transferd started")

    def _failed_to_start(self, failure):
        """Log why, then stop; twistd itself would exit 0, so exit 1 once the reactor has stopped."""
        self.log.critical("transferd cannot start: {error}", error=failure.getErrorMessage())
        if self.reactor.running:
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
            self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        # The stager first: it cancels pending recalls, so the queue does not
        # wait for workers that would only wait for a simulated tape.
        yield self._close(self.stager)
        if self._children_started:
            yield super().stopService()
        else:
            service.Service.stopService(self)
        for resource in (self.mover, self.store):
            yield self._close(resource)

    @defer.inlineCallbacks
    def _close(self, resource):
        try:
            yield resource.close()
        except Exception:
            self.log.failure("error while closing {resource}", resource=resource)
