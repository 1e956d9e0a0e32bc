"""twistd entry point: `twistd -n transferd [--config FILE] [--endpoint SPEC]`."""

import importlib
import ipaddress
import os
import signal
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import defer
from twisted.internet.endpoints import (
    TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint, serverFromString,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.logger import Logger
from twisted.python import usage

from transferd.api import TransferAPI
from transferd.audit import AuditLog
from transferd.auth.access import Access
from transferd.auth.tokens import TokenVerifier
from transferd.auth.x509 import ServerTLS
from transferd.config import ConfigError, load_config
from transferd.pipeline import Pipeline, Reconciler
from transferd.queue import open_queue
from transferd.store import open_store
from transferd.tls import CredentialError
from transferd.validation import DestinationRules
from transferd.web import LimitedSite, harden


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


def listens_beyond_loopback(endpoint):
    """True unless endpoint surely accepts only local connections (loopback address, unix socket)."""
    if isinstance(endpoint, UNIXServerEndpoint):
        return False
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        interface = endpoint._interface  # the endpoint's only record of its address
        try:
            return not ipaddress.ip_address(interface).is_loopback
        except ValueError:
            return True  # "" (every interface) or a host name
    return True


def check_security(config, endpoint):
    """Refuse set-ups that would expose an unauthenticated API, or that cannot authenticate as configured."""
    auth, api = config.auth, config.api
    if auth.x509_ca_path and not api.tls_cert:
        raise ConfigError("[auth] x509_ca_path needs [api] tls_cert and tls_key: client certificates come with TLS")
    if auth.token_issuers and not auth.token_audiences:
        raise ConfigError("[auth] token_issuers needs [auth] token_audiences (the aud values meaning this service)")
    if auth.stager_dns and not auth.x509_ca_path:
        raise ConfigError("[auth] stager_dns needs [auth] x509_ca_path: stagers are known by their certificates")
    if api.tls_cert and not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        raise ConfigError("[api] tls_cert needs a tcp: or tcp6: [api] endpoint (transferd adds TLS itself)")
    if listens_beyond_loopback(endpoint) and not (api.tls_cert and (auth.x509_ca_path or auth.token_issuers)):
        raise ConfigError(
            f"refusing to listen on {api.endpoint} without authentication: beyond loopback, transferd needs"
            " TLS ([api] tls_cert, tls_key) and a way to know who is asking ([auth] x509_ca_path for client"
            " certificates, [auth] token_issuers and token_audiences for bearer tokens); see conf/transferd.ini."
            " To stay local, listen on tcp:PORT:interface=127.0.0.1"
        )


def build_listener(config, reactor, site):
    """The factory to listen with: the site, inside TLS when configured, inside the connection limits."""
    factory = site
    if config.api.tls_cert:
        try:
            tls = ServerTLS(
                config.api.tls_cert, config.api.tls_key, ca_path=config.auth.x509_ca_path,
                require_client_cert=bool(config.auth.x509_ca_path) and not config.auth.token_issuers,
            )
        except CredentialError as error:
            raise ConfigError(f"[api] tls_cert / [auth] x509_ca_path: {error}") from None
        factory = TLSMemoryBIOFactory(tls, False, site)
    return harden(factory, config.api.max_connections_per_peer, config.api.connection_timeout, reactor)


def build_access(config, reactor):
    """The Access rules, and the token verifier (a service to start) when tokens are accepted."""
    tokens = None
    if config.auth.token_issuers:
        tokens = TokenVerifier(
            config.auth.token_issuers, config.auth.token_audiences, reactor, refresh=config.auth.jwks_refresh,
        )
    access = Access(
        x509=bool(config.auth.x509_ca_path), tokens=tokens,
        admins=config.auth.admins, stager_dns=config.auth.stager_dns,
    )
    return access, tokens


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
        try:
            endpoint = serverFromString(reactor, config.api.endpoint)
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError(f"bad value for [api] endpoint = {config.api.endpoint!r}: {error}") from None
        check_security(config, endpoint)
        access, tokens = build_access(config, reactor)
        try:
            self.audit = AuditLog(config.auth.audit_log)
        except OSError as error:
            raise ConfigError(f"cannot open [auth] audit_log {config.auth.audit_log}: {error.strerror}") from None
        self.api = TransferAPI(
            store, self.pipeline, stager, reactor,
            destinations=DestinationRules(
                config.transfer.allowed_schemes, config.transfer.file_roots,
                config.transfer.allowed_hosts, config.transfer.denied_hosts,
            ),
            max_body_bytes=config.api.max_body_bytes,
            access=access,
            audit=self.audit,
        )
        site = LimitedSite(
            self.api.resource(), config.api.max_body_bytes, access_log=config.api.access_log,
            timeout=config.api.idle_timeout, max_header_bytes=config.api.max_header_bytes,
        )
        self.http = StreamServerEndpointService(endpoint, build_listener(config, reactor, site))
        self.reconcile_timer = TimerService(config.reconciler.interval, self.reconciler.run_once)
        self.reconcile_timer.clock = reactor
        # The token verifier starts before the API, so its key files are loaded when the port opens.
        for child in (queue, self.pipeline, tokens, self.http, self.reconcile_timer):
            if child is not None:
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
        self.audit.close()

    @defer.inlineCallbacks
    def _close(self, resource):
        try:
            yield resource.close()
        except Exception:
            self.log.failure("error while closing {resource}", resource=resource)
