"""transferd's Prometheus metrics: one registry per daemon, served at /metrics (docs/operations.md lists them).

Metrics holds the registry and the instruments the parts of the daemon
count with: the store (transitions, time in each state), the APIs
(submissions), the HTTP client (calls to other services), the pipeline
(leases, dead letters) and the reconciler.  Each daemon has its own
registry, never prometheus_client's global one, so daemons built side by
side in tests count apart.  What is read rather than counted (jobs by
state, the broker's connection, the database pool) is collected at scrape
time by StatusCollector: jobs by state come from the store, one GROUP BY
query at most every max_age seconds, however often Prometheus scrapes.

No label takes its value from user input: states, services, outcomes and
reasons are fixed sets, so the number of series is bounded.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.internet import defer
from twisted.logger import Logger

from transferd import jobs

# Seconds a job spends in a state, and from submission to SUCCESS: 1 s to 30 days.
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400,
               172800, 345600, 604800, 1209600, 2592000)
# Seconds one call to another service takes.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# The services transferd calls over HTTP (HTTPClient's `service`): the only values of the `service` label.
SERVICES = ("stager", "taperest", "fts", "destination", "token_issuer", "webhook")
# How a call ended (HTTPClient): an answer by its status class, or why there was none.
CALL_OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "timeout", "refused", "error", "cancelled")
# Why a submission was refused, by the HTTP status of the refusal (anything else: "other").
REFUSALS = {400: "invalid", 401: "unauthenticated", 403: "forbidden", 404: "unknown_product", 405: "method",
            409: "conflict", 413: "too_large", 415: "invalid", 422: "invalid", 429: "limited",
            500: "internal", 503: "store_unavailable"}
APIS = ("legacy", "v1")


def refusal_reason(status):
    """The reason label for a submission refused with this HTTP status."""
    return REFUSALS.get(status, "other")


class Metrics:
    """The daemon's registry and the instruments its parts count with."""

    def __init__(self):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.transitions = Counter(
            "transferd_job_transitions", "Job state changes, by the state left and the state entered",
            ["from_state", "to_state"], registry=registry)
        self.time_in_state = Histogram(
            "transferd_job_state_duration_seconds",
            "Seconds jobs spent in a state (since they entered it, or began its latest attempt) before leaving it",
            ["state"], buckets=JOB_BUCKETS, registry=registry)
        self.submit_to_success = Histogram(
            "transferd_job_submit_to_success_seconds", "Seconds from submission to SUCCESS",
            buckets=JOB_BUCKETS, registry=registry)
        self.submissions = Counter(
            "transferd_submissions", "Jobs submitted and accepted, and submissions refused, by API and reason",
            ["api", "outcome", "reason"], registry=registry)
        self.calls = Counter(
            "transferd_service_calls", "HTTP calls to other services, by service and outcome",
            ["service", "outcome"], registry=registry)
        self.call_duration = Histogram(
            "transferd_service_call_duration_seconds", "Seconds HTTP calls to other services took, by service",
            ["service"], buckets=CALL_BUCKETS, registry=registry)
        self.leases_renewed = Counter(
            "transferd_leases_renewed", "Job leases renewed by this daemon's workers", registry=registry)
        self.redriven = Counter(
            "transferd_reconciler_redriven_jobs", "Jobs the reconciler found free and queued again",
            registry=registry)
        self.dead_letters = Counter(
            "transferd_dead_letters", "Queue messages that failed too often; their jobs ended in ERROR",
            ["queue"], registry=registry)
        # Every series that can exist is there from the start (at 0), so rates and increases see the first one.
        for old, targets in jobs.TRANSITIONS.items():
            for new in targets:
                self.transitions.labels(old, new)
        for state in jobs.ACTIVE:
            self.time_in_state.labels(state)
        for api in APIS:
            self.submissions.labels(api, "accepted", "")
        for queue in ("staging", "transfer"):
            self.dead_letters.labels(queue)

    # -- what the parts report -----------------------------------------------------

    def transitioned(self, old, new, in_state=None, since_submitted=None):
        """A job moved old -> new, after in_state seconds in old; since_submitted: seconds since its submission."""
        self.transitions.labels(old, new).inc()
        if in_state is not None:
            self.time_in_state.labels(old).observe(max(0.0, in_state))
        if new == jobs.SUCCESS and since_submitted is not None:
            self.submit_to_success.observe(max(0.0, since_submitted))

    def accepted(self, api, count=1):
        self.submissions.labels(api, "accepted", "").inc(count)

    def refused(self, api, status, count=1):
        self.submissions.labels(api, "refused", refusal_reason(status)).inc(count)

    def calls_to(self, service):
        """A client of service exists: its series are there from now on, at 0 until it calls."""
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r} for metrics (known: {', '.join(SERVICES)})")
        for outcome in CALL_OUTCOMES:
            self.calls.labels(service, outcome)
        self.call_duration.labels(service)

    def called(self, service, outcome, seconds):
        self.calls.labels(service, outcome).inc()
        self.call_duration.labels(service).observe(seconds)

    def exposition(self, accept=None):
        """(body bytes, Content-Type) of the registry in the format the Accept header asks for.

        Prometheus' text format 0.0.4 by default; OpenMetrics (or text 1.0.0)
        when the scraper asks for it, as Prometheus does.
        """
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class StatusCollector:
    """What is read at scrape time: jobs by state (from the store, cached), the broker, the database pool.

    refresh() is awaited before each scrape is rendered; it asks the store
    only when its counts are older than max_age seconds, and one query
    serves every scrape that arrives while it runs.  While the store cannot
    answer, the last counts are shown, with the time they were read.
    """

    log = Logger()

    def __init__(self, store, queue, clock, max_age=5.0):
        self.store = store
        self.queue = queue
        self.clock = clock
        self.max_age = max_age
        self.counts = None  # {status: count} of the last query that answered
        self.counted_at = None  # clock time of that query
        self._waiting = []  # Deferreds of the scrapes waiting for the query in flight

    def refresh(self):
        """Fire once the counts are at most max_age old (or the store failed to give newer ones)."""
        if self.counted_at is not None and self.clock.seconds() - self.counted_at < self.max_age:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:  # no query in flight: start one
            defer.Deferred.fromCoroutine(self._count())
        return waiter

    async def _count(self):
        try:
            counts = await self.store.count_by_status()
        except Exception as error:
            self.log.warn("could not count jobs by state for /metrics: {error}", error=error)
        else:
            self.counts = {status: counts.get(status, 0) for status in jobs.STATES}
            self.counted_at = self.clock.seconds()
        finally:
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)

    def describe(self):
        return []  # collected at scrape time only: nothing to ask at registration

    def collect(self):
        if self.counts is not None:
            by_state = GaugeMetricFamily("transferd_jobs", "Jobs in the store, by state", labels=["state"])
            for status, count in self.counts.items():
                by_state.add_metric([status], count)
            yield by_state
            yield GaugeMetricFamily("transferd_jobs_counted_timestamp_seconds",
                                    "When transferd_jobs was read from the store (Unix time)",
                                    value=self.counted_at)
        connected = getattr(self.queue, "connected", None)
        if connected is not None:
            yield GaugeMetricFamily("transferd_broker_connected",
                                    "1 while the queue can publish (connected to RabbitMQ), else 0",
                                    value=int(bool(connected)))
        pool = getattr(self.store, "pool", None)
        threads = getattr(pool, "threadpool", None)
        if threads is not None:
            yield GaugeMetricFamily("transferd_database_pool_in_use",
                                    "Database connections running a transaction now", value=len(threads.working))
            yield GaugeMetricFamily("transferd_database_pool_max", "Database connections the pool may open",
                                    value=pool.max)
