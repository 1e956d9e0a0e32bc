"""Events: every state change of a job, sent as signed webhooks and published to RabbitMQ.

A transition writes its event to the outbox in its own transaction
(transferd.store.outbox); nothing is sent before that commit, and what a
crash leaves unsent is sent after it, so no event is lost and none is sent
that did not happen.  The EventDispatcher wakes right after each commit
that wrote events, and sweeps every [events] sweep_interval for what
another daemon or a crash left.  It fans each event out to the targets
that want it:

* the job's own notify_url (v1 submissions, /submitTransfer's form field),
  for the states of [events] notify_states, signed with a secret derived
  for the submitter from [events] notify_secret_file (GET /api/v1/whoami
  shows it to them); its addresses are checked when connecting: the
  destination host rules, and no loopback, private or link-local address
  unless [transfer] allowed_hosts names it;
* each [events] subscribers line (the operator's own receivers), for the
  states it lists, signed with the secret(s) in its file;
* the topic exchange [events] exchange (default <prefix>.events) when the
  queue is RabbitMQ and [events] amqp is on: every state, routing key
  job.<state>, persistent and confirmed, with the fields FTS3's monitoring
  messages use.

Webhooks follow Standard Webhooks: headers webhook-id (the event's stable
id, the same on every retry: receivers de-duplicate by it),
webhook-timestamp and webhook-signature ("v1,<base64 HMAC-SHA256 of
'{id}.{timestamp}.{body}'>", one per secret, space-separated).  Any 2xx
is delivered; 410 gives up at once; anything else is tried again after
retry_delay, doubling up to max_retry_delay (or the answer's Retry-After,
within the same cap), until max_attempts, when the delivery is given up
with a log line and transferd_events_given_up_total.  Each target gets a
job's events in order: a webhook waits until the one before it was
delivered or given up; the AMQP lane claims a job's due events as a run
and publishes them in order on its one channel, and when one of them
fails, those after it are sent again after it.  A woken lane waits
`linger` (250 ms) before its cycle, so that one cycle carries what many
jobs did meanwhile.
"""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import random
import socket
from urllib.parse import urlsplit

from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from transferd.config import ConfigError
from transferd.http import HTTPClient, describe
from transferd.interfaces import IReconfigurable
from transferd.store.outbox import DELIVERED, GIVEN_UP, PENDING, Outbox, Outcome
from transferd.validation import BadRequest, DestinationRules

SECRET_PREFIX = "whsec_"
NOTIFY, AMQP, SUBSCRIBER = "notify", "amqp", "subscriber:"
MAX_NOTIFY_URL = 2048
CLAIM_LEASE_MARGIN = 5.0  # seconds a claim outlives the call's own time limit (then another dispatcher may send it)


# -- secrets and signatures -------------------------------------------------------------


def read_secrets(path):
    """The signing keys in a secret file: one "whsec_<base64>" per line (several while rotating); ValueError.

    The first signs alone once the others are removed.  Messages never show
    the file's content.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError as error:
        raise ValueError(f"cannot read the secret file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"the secret file {path} is not text") from None
    if not lines:
        raise ValueError(f"the secret file {path} is empty: write a secret whsec_<base64> in it")
    keys = []
    for number, line in enumerate(lines, 1):
        if not line.startswith(SECRET_PREFIX):
            raise ValueError(f"line {number} of the secret file {path} does not start with {SECRET_PREFIX}")
        try:
            key = base64.b64decode(line[len(SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"line {number} of the secret file {path} is not {SECRET_PREFIX} and base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError(f"line {number} of the secret file {path}: a secret must be 24 to 64 bytes"
                             f" before base64 (this one is {len(key)})")
        keys.append(key)
    return tuple(keys)


def new_secret():
    """A fresh secret as a secret file holds it (docs/operations.md: openssl rand -base64 32 does the same)."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def signature(keys, webhook_id, timestamp, body):
    """The webhook-signature header: "v1,<base64 HMAC-SHA256>" of "{id}.{timestamp}.{body}" per key."""
    signed = f"{webhook_id}.{timestamp}.".encode("ascii") + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
                    for key in keys)


def submitter_keys(master_keys, submitter):
    """The keys that sign a submitter's notify_url webhooks: one per master key, never the master itself."""
    label = b"transferd notify_url\n" + (submitter or "").encode("utf-8")
    return tuple(hmac.new(master, label, hashlib.sha256).digest() for master in master_keys)


def as_secret(key):
    return SECRET_PREFIX + base64.b64encode(key).decode("ascii")


def webhook_id(delivery):
    """The event's stable id: the same on every attempt and for every target (no '.', as the scheme needs)."""
    return f"{delivery.job_id}_{delivery.event_id}"


# -- where per-job webhooks may go ----------------------------------------------------------


class WebhookRules(DestinationRules):
    """The destination host rules, and no internal address (loopback, private...) unless allowed_hosts names it."""

    @property
    def restricts_addresses(self):
        return True

    def check_address(self, host, address):
        super().check_address(host, address)
        parsed = ipaddress.ip_address(address)
        parsed = getattr(parsed, "ipv4_mapped", None) or parsed
        if parsed.is_global:
            return
        host = host.lower().rstrip(".")
        if not any(matches(name) for matches in self.allowed_hosts for name in (host, address)):
            raise BadRequest(f"notify_url host {host} resolves to {address}, an internal address this service does"
                             " not call unless [transfer] allowed_hosts names it")


class Notifications:
    """Per-job webhooks: whether they are on, where they may go, and each submitter's secret."""

    def __init__(self, rules, master_keys):
        self.rules = rules  # WebhookRules
        self.master_keys = master_keys  # () when [events] notify_secret_file is unset: notify_url is refused

    @property
    def enabled(self):
        return bool(self.master_keys)

    def check(self, value):
        """The notify_url as given, or BadRequest saying what is wrong (names are checked again when connecting)."""
        if not self.enabled:
            raise BadRequest("this service sends no per-job webhooks ([events] notify_secret_file is not set):"
                             " leave notify_url out")
        if not isinstance(value, str) or not value:
            raise BadRequest("notify_url must be an http:// or https:// URL")
        if len(value) > MAX_NOTIFY_URL:
            raise BadRequest(f"notify_url is longer than {MAX_NOTIFY_URL} characters")
        if any(ord(char) < 0x21 or ord(char) == 0x7f for char in value):
            raise BadRequest("notify_url contains spaces or control characters")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise BadRequest(f"notify_url {value!r} is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("notify_url must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.fragment:
            raise BadRequest("notify_url must not contain user information or a fragment")
        host = self.rules.check_host(parts.hostname, "notify_url host", "one this service calls")
        try:
            self.rules.check_address(host, str(ipaddress.ip_address(host)))
        except ValueError as error:  # a name (resolved when connecting), or a refused literal address
            if isinstance(error, BadRequest):
                raise
        return value

    def secret_for(self, submitter):
        """The secret (whsec_...) that signs this submitter's notify_url webhooks; None when they are off."""
        keys = submitter_keys(self.master_keys[:1], submitter)
        return as_secret(keys[0]) if keys else None


def notifications_from_config(config):
    """Notifications for config (its secret file read now; ConfigError when it cannot be used)."""
    transfer = config.transfer
    rules = WebhookRules(("http", "https"), (), transfer.allowed_hosts, transfer.denied_hosts)
    keys = ()
    if config.events.notify_secret_file:
        try:
            keys = read_secrets(config.events.notify_secret_file)
        except ValueError as error:
            raise ConfigError(f"[events] notify_secret_file: {error}") from None
    return Notifications(rules, keys)


# -- what is sent -----------------------------------------------------------------------


def _iso(moment):
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def _metadata(delivery):
    try:
        return json.loads(delivery.metadata) if delivery.metadata else None
    except ValueError:
        return None


def webhook_body(delivery):
    """The webhook's JSON body (bytes, compact: exactly what is signed)."""
    data = {
        "event_id": webhook_id(delivery),
        "job_id": delivery.job_id,
        "product_id": delivery.product_id,
        "destination_path": delivery.destination_path,
        "submitter": delivery.submitter,
        "state": delivery.new_status,
        "previous_state": delivery.old_status,
        "time": _iso(delivery.time),
        "reason": delivery.reason,
        "label": delivery.label,
    }
    if delivery.fts_jobid:
        data["fts_job_id"] = delivery.fts_jobid
    body = {"type": f"job.{delivery.new_status.lower()}", "timestamp": _iso(delivery.time), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def amqp_body(delivery, endpoint):
    """The AMQP message: FTS3 monitoring messages' field names where one applies, transferd's own after them."""
    source = None
    if delivery.stager_path:
        source = f"{delivery.stager_hostname}:{delivery.stager_path}" if delivery.stager_hostname else \
            delivery.stager_path
    moment = delivery.time
    body = {
        "endpnt": endpoint,
        "job_id": delivery.job_id,
        "job_state": delivery.new_status,
        "previous_job_state": delivery.old_status,
        "submit_time": _iso(delivery.time_submitted),
        "staging_start": _iso(delivery.time_staging),
        "staging_finished": _iso(delivery.time_staged),
        "reason": delivery.reason,
        "user_dn": delivery.submitter,
        "src_url": source,
        "dst_url": delivery.destination_path,
        "job_metadata": _metadata(delivery),
        "timestamp": int(moment.timestamp() * 1000) if moment is not None else None,
        "event_id": webhook_id(delivery),
        "product_id": delivery.product_id,
        "fts_job_id": delivery.fts_jobid,
        "label": delivery.label,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def routing_key(state):
    return f"job.{state.lower()}"


# -- metrics --------------------------------------------------------------------------------


class EventMetrics:
    """Deliveries by target and outcome, and events given up, in a daemon's registry (transferd.metrics)."""

    OUTCOMES = (DELIVERED, "retried", GIVEN_UP)

    def __init__(self, registry):
        self.deliveries = Counter(
            "transferd_event_deliveries",
            "Attempts to deliver an event (webhooks and AMQP), by target (notify, amqp, or the subscriber's"
            " name) and outcome (delivered, retried, given_up)", ["target", "outcome"], registry=registry)
        self.given_up = Counter(
            "transferd_events_given_up", "Events given up for a target after [events] max_attempts (or a 410)",
            ["target"], registry=registry)

    def prepare(self, targets):
        for target in targets:
            for outcome in self.OUTCOMES:
                self.deliveries.labels(target, outcome)
            self.given_up.labels(target)

    def counted(self, target, outcome):
        self.deliveries.labels(target, outcome).inc()
        if outcome == GIVEN_UP:
            self.given_up.labels(target).inc()


# -- the dispatcher -------------------------------------------------------------------------


class _Settings:
    """What one configuration says about events (swapped whole on reload)."""

    def __init__(self, config, notifications, exchange):
        events = config.events
        self.subscribers = {}
        for subscriber in events.subscribers:
            try:
                keys = read_secrets(subscriber.secret_file)
            except ValueError as error:
                raise ConfigError(f"[events] subscribers ({subscriber.name}): {error}") from None
            self.subscribers[subscriber.name] = (subscriber, keys)
        self.notifications = notifications
        self.notify_states = frozenset(events.notify_states)
        self.exchange = exchange if events.amqp else None
        self.timeout = events.timeout
        self.retry_delay = events.retry_delay
        self.max_retry_delay = events.max_retry_delay
        self.max_attempts = events.max_attempts
        self.sweep_interval = events.sweep_interval

    def targets(self, state, notify_url):
        targets = []
        if notify_url and self.notifications.enabled and state in self.notify_states:
            targets.append(NOTIFY)
        targets += [SUBSCRIBER + name for name, (subscriber, _) in self.subscribers.items()
                    if state in subscriber.states]
        if self.exchange is not None:
            targets.append(AMQP)
        return targets


class _Lane:
    """The deliveries of some targets (targets: these; exclude: all but these), sent one cycle at a time."""

    def __init__(self, name, targets, exclude):
        self.name = name
        self.targets = targets
        self.exclude = exclude
        self.cycle = None  # the running cycle's Deferred
        self.again = False  # woken during the cycle: run another


class _Failed(Exception):
    """A delivery that did not succeed: why, and a wait the receiver asked for (Retry-After), or give up now."""

    def __init__(self, message, retry_after=None, give_up=False):
        super().__init__(message)
        self.retry_after = retry_after
        self.give_up = give_up


@implementer(IReconfigurable)
class EventDispatcher(Service):
    """Sends the outbox's events: woken after each commit that wrote some, and every sweep_interval."""

    log = Logger()
    batch = 500  # AMQP deliveries claimed at once (published together, confirmed together)
    webhook_batch = 32  # webhook deliveries claimed at once: calls in flight to one target
    # Seconds a lane waits after a wake before its cycle.  A cycle costs the
    # same few transactions whether it carries one event or hundreds; under
    # load a commit wakes the dispatcher every millisecond or two, and this
    # short wait lets one cycle carry what every job did meanwhile.  A lane
    # whose last cycle claimed a full batch does not wait.
    linger = 0.25

    def __init__(self, store, config, reactor, clock, publisher=None, metrics=None, registry=None,
                 endpoint=None, owner=None, random=random.random):
        self.outbox = Outbox(store)
        self.store = store
        self.reactor = reactor
        self.clock = clock
        self.publisher = publisher  # transferd.queue.amqp.AMQPJobQueue, or None
        self.metrics = metrics  # transferd.metrics.Metrics (its HTTP call counts), or None
        self.counts = EventMetrics(registry) if registry is not None else None
        self.endpoint = endpoint  # [api] public_url, named in AMQP messages as FTS names itself (endpnt)
        self.owner = owner or f"events:{socket.gethostname()}:{os.getpid()}"[:64]
        self.random = random
        self.default_exchange = f"{publisher.prefix}.events" if publisher is not None else None
        self.notifications = notifications_from_config(config)  # the APIs check notify_url with it
        self.settings = self._settings(config, self.notifications)
        self._clients = self._new_clients(config, self.notifications.rules)
        self._retired = []  # clients a reload replaced, stopped once the cycle using them ends
        self._lane_by_name = {}  # target name (None: the rest) -> its _Lane
        self._busy = set()  # lanes running a cycle, those a reload dropped included
        self._timer = None  # the next wake-up for a retry: (time, IDelayedCall)
        self._fanning = False  # a fan-out is running
        self._fan_waiters = []  # lanes waiting for the next fan-out
        self._sweep = None
        store.listen_for_events(lambda moved: self.wake())  # arrivals and moves alike

    def _settings(self, config, notifications):
        exchange = (config.events.exchange or self.default_exchange) if self.publisher is not None else None
        settings = _Settings(config, notifications, exchange)
        if self.counts is not None:
            self.counts.prepare([NOTIFY] * settings.notifications.enabled + list(settings.subscribers)
                                + [AMQP] * (settings.exchange is not None))
        return settings

    def _new_clients(self, config, rules):
        """(for notify_url, for subscribers): the one HTTP client, checked addresses for users' URLs only."""
        timeout = config.events.timeout
        user = HTTPClient(self.reactor, self.clock, timeout=timeout, max_body=65536, per_host=8, service="webhook",
                          metrics=self.metrics, destinations=rules)
        operator = HTTPClient(self.reactor, self.clock, timeout=timeout, max_body=65536, per_host=8,
                              service="webhook", metrics=self.metrics)
        return user, operator

    # -- IReconfigurable --------------------------------------------------------------

    def reconfigure(self, config):
        """New subscribers, secrets, states, limits and host rules, all at once; ConfigError changes nothing."""
        fresh = notifications_from_config(config)  # everything is read and checked before anything changes
        settings = self._settings(config, self.notifications)
        clients, self._retired = self._new_clients(config, fresh.rules), self._retired + list(self._clients)
        self.notifications.rules, self.notifications.master_keys = fresh.rules, fresh.master_keys
        self.settings, self._clients = settings, clients
        if not self._busy:
            self._stop_retired()
        self.log.info("events: {n} subscriber(s), per-job webhooks {notify}", n=len(settings.subscribers),
                      notify="on" if settings.notifications.enabled else "off")
        self.wake(sweep=True)

    def _stop_retired(self):
        retired, self._retired = self._retired, []
        for client in retired:
            client.stop()

    # -- service ----------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._sweep = task.LoopingCall(self.wake, sweep=True)
        self._sweep.clock = self.clock
        self._sweep.start(self.settings.sweep_interval, now=True)

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        if self._timer is not None and self._timer[1].active():
            self._timer[1].cancel()
        self._timer = None
        for client in self._clients:
            client.stop()  # calls in flight fail: their deliveries are claimed again after the lease
        running = [lane.cycle for lane in self._busy if lane.cycle is not None]
        if running:
            await defer.DeferredList(running)
        self._stop_retired()

    # -- the work ---------------------------------------------------------------------

    def wake(self, sweep=False):
        """Send what is due now: every lane runs a cycle (one running already runs another after it).

        The lane of targets no longer configured runs on sweeps only.
        """
        if not self.running:
            return
        for lane in self._lanes():
            if lane.name is None and not sweep:
                continue
            if lane.cycle is not None:
                lane.again = True
                continue
            self._busy.add(lane)
            cycle = defer.Deferred.fromCoroutine(self._run(lane))
            if not cycle.called:  # a cycle that ended at once has already cleared lane.cycle
                lane.cycle = cycle

    def _lanes(self):
        """One lane per target, so that a slow receiver delays only its own deliveries; one for the rest
        (targets no longer configured: their deliveries are given up)."""
        settings = self.settings
        names = ([NOTIFY] * settings.notifications.enabled + [SUBSCRIBER + name for name in settings.subscribers]
                 + [AMQP] * (settings.exchange is not None))
        lanes = {name: self._lane_by_name.get(name) or _Lane(name, (name,), None) for name in names}
        rest = self._lane_by_name.get(None)
        lanes[None] = rest if rest is not None and rest.exclude == tuple(names) else _Lane(None, None, tuple(names))
        # A lane dropped by a reload finishes its cycle on its own; the rest lane then gives up what it left.
        self._lane_by_name = lanes
        return list(lanes.values())

    async def _run(self, lane):
        try:
            backlog = False
            while self.running:
                if not backlog and self.linger > 0:
                    await task.deferLater(self.reactor, self.linger, lambda: None)
                    if not self.running:
                        break
                lane.again = False
                try:
                    worked, backlog = await self._cycle(lane)
                except Exception as error:
                    self.log.warn("events: could not send events now ({error}); trying again in {wait:g}s",
                                  error=describe(error), wait=self.settings.sweep_interval)
                    return
                if worked or lane.again:
                    continue
                await self._schedule_retry()
                if not lane.again:  # a wake while the retry was scheduled runs the lane once more
                    break
        except Exception:
            self.log.failure("events: the dispatcher failed")
        finally:
            lane.cycle = None
            self._busy.discard(lane)
            if not self._busy:
                self._stop_retired()

    async def run_once(self, lane=None):
        """Fan out new events, send what is due (of the lane's targets); fire with whether anything was done."""
        worked, _ = await self._cycle(lane)
        return worked

    async def _cycle(self, lane):
        """run_once's work; fires with (anything done, a full batch claimed: more may be due at once)."""
        settings = self.settings
        fanned = await self._fan_out()
        amqp = lane is not None and lane.name == AMQP
        batch = self.batch if lane is None or amqp else self.webhook_batch
        claimed = await self.outbox.claim(self.owner, settings.timeout + CLAIM_LEASE_MARGIN, batch,
                                          targets=lane.targets if lane else None,
                                          exclude=lane.exclude if lane else None, runs=amqp)
        if not claimed:
            return bool(fanned), False
        # Started in order: the AMQP lane's publishes leave in event order.
        outcomes = await defer.gatherResults([defer.Deferred.fromCoroutine(self._deliver(settings, delivery))
                                              for delivery in claimed])
        outcomes = self._in_order(claimed, outcomes)
        for delivery, outcome in zip(claimed, outcomes):
            if outcome.status == DELIVERED:
                self._count(_target_name(delivery.target), DELIVERED)
        await self.outbox.record(self.owner, outcomes)
        return True, len(claimed) >= batch

    def _in_order(self, claimed, outcomes):
        """A delivery sent after an earlier one of its job and target failed is sent again after it.

        Only a run (the AMQP lane) holds several deliveries of one job and
        target; the receiver may see the later event twice, never only
        before the earlier one.
        """
        failed = {}  # (job_id, target) -> the failed earlier delivery's Outcome
        kept = []
        for delivery, outcome in zip(claimed, outcomes):
            key = (delivery.job_id, delivery.target)
            earlier = failed.get(key)
            if earlier is not None and outcome.status == DELIVERED:
                self._count(_target_name(delivery.target), "retried")
                outcome = Outcome(delivery.delivery_id, PENDING, next_attempt=earlier.next_attempt,
                                  error="sent again after an earlier event of the job, which was not delivered")
            if outcome.status == PENDING:
                failed.setdefault(key, outcome)
            kept.append(outcome)
        return kept

    def _fan_out(self):
        """Fan out for a lane: one fan-out runs at a time; lanes asking meanwhile share the next one, which
        begins after it, so it sees every event committed before they asked."""
        waiter = defer.Deferred()
        self._fan_waiters.append(waiter)
        if not self._fanning:
            self._next_fan_out()
        return waiter

    def _next_fan_out(self):
        waiters, self._fan_waiters = self._fan_waiters, []
        self._fanning = True
        settings = self.settings

        def done(result):
            self._fanning = False
            for each in waiters:
                each.errback(result) if isinstance(result, Failure) else each.callback(result)
            if self._fan_waiters:
                self._next_fan_out()

        self.outbox.fan_out(settings.targets, notify_urls=settings.notifications.enabled).addBoth(done)

    async def _schedule_retry(self):
        """Wake when the next retry is due (the sweep would find it too, later)."""
        due = await self.outbox.next_due()
        if due is None or not self.running:
            return
        now = self.clock.seconds()
        if self._timer is not None:
            if self._timer[1].active() and self._timer[0] <= due:
                return
            if self._timer[1].active():
                self._timer[1].cancel()
        self._timer = (due, self.clock.callLater(max(0.0, due - now) + 0.01, self.wake))

    async def _deliver(self, settings, delivery):
        """Send one delivery; its Outcome (never raises)."""
        target = delivery.target
        name = _target_name(target)
        try:
            if target == NOTIFY:
                if not settings.notifications.enabled:
                    raise _Failed("per-job webhooks are no longer sent ([events] notify_secret_file)", give_up=True)
                await self._post(self._clients[0], delivery.notify_url,
                                 submitter_keys(settings.notifications.master_keys, delivery.submitter), delivery)
            elif target == AMQP:
                if settings.exchange is None:
                    raise _Failed("AMQP events are no longer configured", give_up=True)
                await self._publish(settings.exchange, delivery)
            else:
                subscriber = settings.subscribers.get(name)
                if subscriber is None:
                    raise _Failed(f"subscriber {name} is no longer configured", give_up=True)
                await self._post(self._clients[1], subscriber[0].url, subscriber[1], delivery)
        except Exception as error:
            return self._failed(settings, delivery, name, error)
        return Outcome(delivery.delivery_id, DELIVERED)  # counted by the cycle, once the order is checked

    def _failed(self, settings, delivery, name, error):
        attempts = delivery.attempts + 1
        why = str(error) if isinstance(error, _Failed) else describe(error)
        if getattr(error, "give_up", False) or attempts >= settings.max_attempts:
            self._count(name, GIVEN_UP)
            self.log.error(
                "event {event} ({state}) of job {job_id} for {target} given up after {attempts} attempt(s): {why}",
                event=webhook_id(delivery), state=delivery.new_status, job_id=delivery.job_id, target=name,
                attempts=attempts, why=why)
            return Outcome(delivery.delivery_id, GIVEN_UP, error=why[:1000])
        wait = min(settings.max_retry_delay, settings.retry_delay * 2 ** (attempts - 1))
        wait *= 1 + 0.1 * self.random()  # jitter: receivers that failed together are not retried together
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            wait = min(settings.max_retry_delay, max(wait, retry_after))
        self._count(name, "retried")
        self.log.info("event {event} of job {job_id} for {target} failed (attempt {attempts}): {why};"
                      " trying again in {wait:.1f}s", event=webhook_id(delivery), job_id=delivery.job_id,
                      target=name, attempts=attempts, why=why, wait=wait)
        return Outcome(delivery.delivery_id, PENDING, next_attempt=self.clock.seconds() + wait, error=why[:1000])

    def _count(self, target, outcome):
        if self.counts is not None:
            self.counts.counted(target, outcome)

    async def _post(self, client, url, keys, delivery):
        body = webhook_body(delivery)
        message_id = webhook_id(delivery)
        timestamp = int(self.clock.seconds())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "transferd",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(keys, message_id, timestamp, body),
        }
        answer = await client.request("POST", url, data=body, headers=headers)
        if 200 <= answer.code < 300:
            return
        if answer.code == 410:
            raise _Failed(f"{_host(url)} answered 410 Gone: it wants no more events", give_up=True)
        raise _Failed(f"{_host(url)} answered {answer.code} {answer.phrase}".rstrip(),
                      retry_after=_retry_after(answer.header("Retry-After")))

    async def _publish(self, exchange, delivery):
        await self.publisher.publish_event(exchange, routing_key(delivery.new_status),
                                           amqp_body(delivery, self.endpoint), webhook_id(delivery))


def _target_name(target):
    """How metrics and logs name a target: notify, amqp, or the subscriber's name."""
    return target[len(SUBSCRIBER):] if target.startswith(SUBSCRIBER) else target


def _host(url):
    """A URL's host only: a notify_url may carry a token in its path or query, which logs must not show."""
    try:
        return urlsplit(url).hostname or "the receiver"
    except ValueError:
        return "the receiver"


def _retry_after(text):
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        return None
    return seconds if 0 <= seconds < 86400 else None


def from_config(config, store, queue, reactor, clock, metrics=None):
    """The dispatcher for config: AMQP events when the queue is RabbitMQ; counts in metrics' registry."""
    publisher = queue if getattr(queue, "publish_event", None) is not None else None
    registry = metrics.registry if metrics is not None else None
    return EventDispatcher(store, config, reactor, clock, publisher=publisher, metrics=metrics, registry=registry,
                           endpoint=config.api.public_url)
