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

from transferd import events, retention
from transferd.api import TransferAPI
from transferd.api_v1 import APIv1, SiteRoot
from transferd.audit import AuditLog
from transferd.auth.access import Access
from transferd.auth.tokens import TokenVerifier
from transferd.auth.voms import VOMSTrust
from transferd.auth.x509 import ServerTLS
from transferd.config import RELOADABLE, ConfigError, needing_restart
from transferd.dashboard import Dashboard
from transferd.fleet import Fleet, this_process
from transferd.health import OperationsAPI, Readiness
from transferd.interfaces import IReconfigurable
from transferd.metrics import Metrics, StatusCollector
from transferd.pipeline import Pipeline, Reconciler
from transferd.queue import open_queue
from transferd.scheduler import Scheduler, policy_from_config
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

    def reconfigurables(self):
        """The parts that take new settings while running: every attribute (or poller) providing IReconfigurable."""
        parts, seen = [], set()
        for value in [*vars(self).values(), *getattr(self, "pollers", ())]:
            if IReconfigurable.providedBy(value) and id(value) not in seen:
                seen.add(id(value))
                parts.append(value)
        return parts

    def reload(self, config):
        """Apply a new configuration (checked as a whole already: transferd.config.load_config) on SIGHUP.

        Keys that only a restart applies are each named in the log.  The
        reloadable ones (transferd.config.RELOADABLE) go to every part that
        takes them; a part refusing (ConfigError) leaves everything as it
        was: the parts that took it already are given the running settings
        back.  Fires nothing; returns True when the new settings are in use.
        """
        for section, key in needing_restart(self.config_at_start, config):
            self.log.warn("[{section}] {key} changed in the configuration file: restart transferd to apply it",
                          section=section, key=key)
        changed = [f"[{section}] {key}" for section, key in sorted(RELOADABLE)
                   if getattr(self.config.sections[section], key) != getattr(config.sections[section], key)]
        if not changed:
            self.log.info("configuration reloaded: no setting that can change while running has changed")
            self.config = config
            return True
        applied = []
        try:
            for part in self.reconfigurables():
                part.reconfigure(config)
                applied.append(part)
        except Exception as error:
            for part in reversed(applied):
                try:
                    part.reconfigure(self.config)
                except Exception:
                    self.log.failure("could not give {part} its running settings back", part=part)
            reason = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
            self.log.error("configuration not reloaded, nothing changed: {reason}", reason=reason)
            return False
        self.config = config
        self.log.info("configuration reloaded: {changed}", changed=", ".join(changed))
        return True


def build(config, reactor, clock=None, stager=None, mover=None):
    """The daemon for config: reactor does the I/O, clock (default: the reactor) tells the time.

    stager, mover: backends built already (tests' scripted ones), instead of the configured ones.
    """
    clock = clock if clock is not None else reactor
    metrics = Metrics()  # this daemon's registry: what its parts count, served at /metrics
    start_wait = config.startup.wait_for_backends  # how long start-up waits for the database and the broker
    store = open_store(config.database.url, reactor, clock, start_wait=start_wait, metrics=metrics)
    queue = open_queue(config.queue.url, reactor, clock, max_deliveries=config.queue.max_deliveries,
                       start_wait=start_wait)
    if stager is None:
        stager = importlib.import_module(STAGERS[config.stager.backend]).from_config(config, reactor, clock, store,
                                                                                     metrics=metrics)
    if mover is None:
        mover = importlib.import_module(MOVERS[config.transfer.backend]).from_config(config, reactor, clock, store,
                                                                                   metrics=metrics)
    this = this_process(clock)  # this daemon in the daemons table; its workers' leases name it
    pipeline = Pipeline(
        store, queue, stager, mover, clock, daemon_id=this.daemon_id,
        prefetch=config.queue.prefetch, lease=config.reconciler.lease, requeue_after=config.reconciler.requeue_after,
        max_deliveries=config.queue.max_deliveries, metrics=metrics, policy=policy_from_config(config),
    )
    # Fair share and limits: which waiting jobs go to the queues next (transferd.scheduler).
    scheduler = Scheduler(store, pipeline, reactor, clock, interval=config.scheduler.interval, daemon_id=this.daemon_id)
    pollers = list(stager.pollers(pipeline)) + list(mover.pollers(pipeline))
    reconciler = Reconciler(store, pipeline, queue_durable=queue.durable, metrics=metrics)
    fleet = Fleet(store, clock, this, heartbeat=config.fleet.heartbeat, stale_after=config.fleet.stale_after,
                  drainables=[pipeline, *pollers, reconciler, scheduler],  # what a drained daemon stops taking work from
                  pollers=pollers)  # they poll this daemon's share of the poll slots
    dispatcher = events.from_config(config, store, queue, reactor, clock, metrics=metrics)  # webhooks, AMQP events
    status = StatusCollector(store, queue, clock, max_age=config.metrics.job_counts_max_age)
    metrics.registry.register(status)
    readiness = Readiness(store, queue, clock)
    tokens = build_token_verifier(config, reactor, metrics)
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
        access=access, audit=audit, metrics=metrics, notifications=dispatcher.notifications,
    )
    api_v1 = APIv1(
        store, pipeline, stager, mover, clock, destinations=destinations, access=access, audit=audit,
        max_body_bytes=config.api.max_body_bytes, max_batch=config.api.max_batch,
        max_batch_bytes=config.api.max_batch_bytes, metrics=metrics, notifications=dispatcher.notifications,
        fleet=fleet, scheduler=scheduler,
    )
    dashboard = Dashboard(api_v1, clock)  # the pages at / (docs/dashboard.md): the v1 API's views and rules
    daemon = Daemon()
    # /livez, /readyz, /metrics; on the API listener /metrics is for admins once authentication is on.
    operations = OperationsAPI(readiness, metrics, status, access=access, audit=audit)
    # [api] endpoint and [metrics] endpoint were checked with the configuration.
    listener = Listener(serverFromString(reactor, config.api.endpoint.text),
                        build_listener(config, reactor,
                                       SiteRoot(api.resource(), api_v1.resource(), operations.resource(),
                                                dashboard.resource()), keep=daemon))
    metrics_listener = None
    if config.metrics.endpoint is not None:  # open to whoever reaches it: a loopback or private interface
        site = LimitedSite(OperationsAPI(readiness, metrics, status).resource(), 0, access_log=False,
                           timeout=config.api.idle_timeout, max_header_bytes=config.api.max_header_bytes)
        metrics_listener = Listener(serverFromString(reactor, config.metrics.endpoint.text),
                                    harden(site, config.api.max_connections_per_peer, config.api.connection_timeout,
                                           reactor))
    reconcile_timer = TimerService(config.reconciler.interval, reconciler.run_once)
    reconcile_timer.clock = clock
    housekeeping = retention.from_config(config, store, clock, stager, mover)

    daemon.store, daemon.queue, daemon.stager, daemon.mover = store, queue, stager, mover
    daemon.scheduler = scheduler
    daemon.pipeline, daemon.pollers, daemon.api, daemon.api_v1, daemon.audit = pipeline, pollers, api, api_v1, audit
    daemon.listener, daemon.reconciler, daemon.housekeeping = listener, reconciler, housekeeping
    daemon.metrics, daemon.status_collector, daemon.readiness = metrics, status, readiness
    daemon.metrics_listener = metrics_listener
    daemon.dashboard = dashboard
    daemon.events = dispatcher
    daemon.fleet, daemon.tokens, daemon.access, daemon.destinations = fleet, tokens, access, destinations
    daemon.config = daemon.config_at_start = config
    # Start order; stopping goes backwards.  The stager and mover outlive the
    # queue, whose stop waits for the transfers in flight.
    for child in (store, stager, mover, queue, dispatcher, pipeline, scheduler, *pollers, tokens, audit, listener, metrics_listener,
                  reconcile_timer, housekeeping, fleet):
        if child is not None:
            child.setServiceParent(daemon)
    return daemon


def build_token_verifier(config, reactor, metrics=None):
    """The bearer token verifier (a service: it loads and refreshes the issuers' keys), or None."""
    auth = config.auth
    if not auth.token_issuers:
        return None
    return TokenVerifier(auth.token_issuers, auth.token_audiences, reactor, reactor, refresh=auth.jwks_refresh,
                         metrics=metrics)


def build_audit_log(config):
    try:
        return AuditLog(config.auth.audit_log)
    except OSError as error:
        raise ConfigError(f"cannot open [auth] audit_log {config.auth.audit_log}: {error.strerror}") from None


def build_listener(config, reactor, root, keep=None):
    """The factory to listen with: the site of root, inside TLS when configured, inside the connection limits.

    The site keeps bodies up to the larger of the two limits; the prototype's
    endpoints refuse those beyond max_body_bytes themselves.  keep (the
    Daemon): gets the site and the TLS side as attributes, which SIGHUP reconfigures.
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
                require_client_cert=bool(config.auth.x509_ca_path) and not config.auth.token_issuers, clock=reactor,
            )
        except CredentialError as error:
            raise ConfigError(f"[api] tls_cert / [auth] x509_ca_path: {error}") from None
        factory = TLSMemoryBIOFactory(tls, False, site)
    if keep is not None:
        keep.site, keep.server_tls = site, tls if config.api.tls_cert else None
    return harden(factory, config.api.max_connections_per_peer, config.api.connection_timeout, reactor)
