"""One place that builds the daemon from its configuration: used by the twistd plugin and by tests.

build() reads like a wiring diagram (docs/architecture.md, "The service
tree").  The daemon is an OrderedService: its children start one after the
other in the order they are added here, and stop in reverse, so the port
opens only once the schema is migrated and everything behind it runs, and
the store closes last.
"""

import importlib

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from transferd import retention
from transferd.api import TransferAPI
from transferd.api_v1 import APIv1, SiteRoot
from transferd.audit import AuditLog
from transferd.auth.access import Access
from transferd.auth.tokens import TokenVerifier
from transferd.auth.voms import VOMSTrust
from transferd.auth.x509 import ServerTLS
from transferd.config import ConfigError
from transferd.pipeline import Pipeline, Reconciler
from transferd.queue import open_queue
from transferd.service import OrderedService
from transferd.store import open_store
from transferd.tls import CredentialError
from transferd.validation import DestinationRules
from transferd.web import LimitedSite, harden

# [stager] backend and [transfer] backend -> the module whose from_config(config, reactor, clock, store) builds it.
STAGERS = {
    "local": "transferd.stagers.local",
    "callback": "transferd.stagers.callback",
    "taperest": "transferd.stagers.taperest",
}
MOVERS = {
    "local": "transferd.movers.local",
    "fts": "transferd.movers.fts",
}


class Listener(Service):
    """Listens on an endpoint while running; startService fires once the port is open (or fails)."""

    def __init__(self, endpoint, factory):
        self.endpoint = endpoint
        self.factory = factory
        self.port = None

    def startService(self):
        super().startService()
        d = self.endpoint.listen(self.factory)
        d.addCallback(lambda port: setattr(self, "port", port))
        return d

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()


class Daemon(OrderedService):
    """The whole daemon; its parts are attributes, for tests and for the operator's tools."""

    log = Logger()

    async def _start_children(self):
        await super()._start_children()
        if self.running:
            self.log.info("transferd started")


def build(config, reactor, clock=None, stager=None, mover=None):
    """The daemon for config: reactor does the I/O, clock (default: the reactor) tells the time.

    stager, mover: backends built already (tests' scripted ones), instead of the configured ones.
    """
    clock = clock if clock is not None else reactor
    start_wait = config.startup.wait_for_backends  # how long start-up waits for the database and the broker
    store = open_store(config.database.url, reactor, clock, start_wait=start_wait)
    queue = open_queue(config.queue.url, reactor, clock, max_deliveries=config.queue.max_deliveries,
                       start_wait=start_wait)
    if stager is None:
        stager = importlib.import_module(STAGERS[config.stager.backend]).from_config(config, reactor, clock, store)
    if mover is None:
        mover = importlib.import_module(MOVERS[config.transfer.backend]).from_config(config, reactor, clock, store)
    pipeline = Pipeline(
        store, queue, stager, mover, clock,
        prefetch=config.queue.prefetch, lease=config.reconciler.lease, requeue_after=config.reconciler.requeue_after,
        max_deliveries=config.queue.max_deliveries,
    )
    pollers = list(stager.pollers(pipeline)) + list(mover.pollers(pipeline))
    tokens = build_token_verifier(config, reactor)
    audit = build_audit_log(config)
    destinations = DestinationRules(
        config.transfer.allowed_schemes, config.transfer.file_roots,
        config.transfer.allowed_hosts, config.transfer.denied_hosts,
    )
    access = Access(x509=bool(config.auth.x509_ca_path), tokens=tokens,
                    admins=config.auth.admins, stager_dns=config.auth.stager_dns,
                    voms=VOMSTrust(config.auth.voms_dir, clock) if config.auth.voms_dir else None)
    api = TransferAPI(
        store, pipeline, stager, clock, destinations=destinations, max_body_bytes=config.api.max_body_bytes,
        access=access, audit=audit,
    )
    api_v1 = APIv1(
        store, pipeline, stager, mover, clock, destinations=destinations, access=access, audit=audit,
        max_body_bytes=config.api.max_body_bytes, max_batch=config.api.max_batch,
        max_batch_bytes=config.api.max_batch_bytes,
    )
    # [api] endpoint was checked with the configuration.
    listener = Listener(serverFromString(reactor, config.api.endpoint.text),
                        build_listener(config, reactor, SiteRoot(api.resource(), api_v1.resource())))
    reconciler = Reconciler(store, pipeline, queue_durable=queue.durable)
    reconcile_timer = TimerService(config.reconciler.interval, reconciler.run_once)
    reconcile_timer.clock = clock
    housekeeping = retention.from_config(config, store, clock, stager, mover)

    daemon = Daemon()
    daemon.store, daemon.queue, daemon.stager, daemon.mover = store, queue, stager, mover
    daemon.pipeline, daemon.pollers, daemon.api, daemon.api_v1, daemon.audit = pipeline, pollers, api, api_v1, audit
    daemon.listener, daemon.reconciler, daemon.housekeeping = listener, reconciler, housekeeping
    # Start order; stopping goes backwards.  The stager and mover outlive the
    # queue, whose stop waits for the transfers in flight.
    for child in (store, stager, mover, queue, pipeline, *pollers, tokens, audit, listener, reconcile_timer,
                  housekeeping):
        if child is not None:
            child.setServiceParent(daemon)
    return daemon


def build_token_verifier(config, reactor):
    """The bearer token verifier (a service: it loads and refreshes the issuers' keys), or None."""
    auth = config.auth
    if not auth.token_issuers:
        return None
    return TokenVerifier(auth.token_issuers, auth.token_audiences, reactor, reactor, refresh=auth.jwks_refresh)


def build_audit_log(config):
    try:
        return AuditLog(config.auth.audit_log)
    except OSError as error:
        raise ConfigError(f"cannot open [auth] audit_log {config.auth.audit_log}: {error.strerror}") from None


def build_listener(config, reactor, root):
    """The factory to listen with: the site of root, inside TLS when configured, inside the connection limits.

    The site keeps bodies up to the larger of the two limits; the prototype's
    endpoints refuse those beyond max_body_bytes themselves.
    """
    site = LimitedSite(
        root, max(config.api.max_body_bytes, config.api.max_batch_bytes), access_log=config.api.access_log,
        timeout=config.api.idle_timeout, max_header_bytes=config.api.max_header_bytes,
    )
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
