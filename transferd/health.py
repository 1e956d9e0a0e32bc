"""The operator's endpoints: /livez, /readyz and /metrics (docs/operations.md).

/livez answers 200 as long as the process and its reactor answer: nothing
else is looked at, so an orchestrator restarts the daemon only when it is
stuck.  /readyz answers 200 when the daemon can do its work now (the store
answers and its schema is the one this transferd knows, the queue can
publish) and 503 naming the failing check otherwise; ?verbose lists every
check.  Both follow the Kubernetes conventions (plain text, "[+]name ok",
"[-]name failed: why"), need no authentication, and say nothing about the
configuration (no host, path or version).  Refusals (401, 403, 404, 405)
are RFC 9457 problems, as on /api/v1; 401 and 403 go to the audit trail.

/metrics is Prometheus' text format.  On its own endpoint ([metrics]
endpoint) it is open; on the API listener it is open only while the API
itself needs no authentication (a loopback listener), and needs an admin
([auth] admins) otherwise: a scraper should not hold credentials that may
read and cancel everyone's jobs, so Prometheus scrapes the own endpoint.
"""

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

import json

from transferd.api import audit_request
from transferd.api_v1 import PROBLEM, problem
from transferd.audit import AuditLog
from transferd.auth.access import Unauthenticated

CHECK_TIMEOUT = 3.0  # seconds a readiness check may take before it counts as failed


class Readiness:
    """The checks of /readyz: each fires with None when it passes, or a short reason (no configuration in it)."""

    def __init__(self, store, queue, clock, timeout=CHECK_TIMEOUT):
        self.store = store
        self.queue = queue
        self.clock = clock
        self.timeout = timeout

    async def check_store(self):
        """The store answers a query, and its schema is at the version this transferd knows."""
        try:
            version = await self.store.schema_version().addTimeout(self.timeout, self.clock)
        except defer.TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except Exception:
            return "unreachable"
        known = len(self.store.migrations)
        if version != known:
            return f"schema version {version}, this transferd needs {known}"
        return None

    async def check_queue(self):
        """The queue can publish (connected to the broker)."""
        return None if self.queue.connected else "not connected"

    async def run(self):
        """[(name, reason or None)] for every check, run side by side."""
        names = ("store", "queue")
        results = await defer.gatherResults([defer.Deferred.fromCoroutine(getattr(self, "check_" + name)())
                                             for name in names])
        return list(zip(names, results))


class OperationsAPI:
    """/livez, /readyz and /metrics.  access: the API's Access when served on the API listener, None on its own."""

    app = Klein()
    log = Logger()

    def __init__(self, readiness, metrics, status, access=None, audit=None):
        self.readiness = readiness
        self.metrics = metrics  # transferd.metrics.Metrics
        self.status = status  # transferd.metrics.StatusCollector
        self.access = access
        self.audit = audit or AuditLog()

    def resource(self):
        return self.app.resource()

    @staticmethod
    def _text(request, code, text, content_type="text/plain; charset=utf-8"):
        request.setResponseCode(code)
        request.setHeader("Content-Type", content_type)
        request.setHeader("Cache-Control", "no-store")
        return text.encode("utf-8") if isinstance(text, str) else text

    def _problem(self, request, status, detail):
        audit_request(self.audit, request, status, detail)
        return self._text(request, status, json.dumps(problem(status, detail)) + "\n", PROBLEM)

    @app.route("/livez", methods=["GET", "HEAD"])
    def livez(self, request):
        return self._text(request, 200, "ok\n")

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request):
        results = await self.readiness.run()
        failed = [name for name, reason in results if reason is not None]
        lines = [f"[+]{name} ok" if reason is None else f"[-]{name} failed: {reason}" for name, reason in results]
        # ?verbose has no value: twisted.web leaves such a parameter out of request.args.
        verbose = b"verbose" in [item.split(b"=")[0] for item in request.uri.partition(b"?")[2].split(b"&")]
        if failed:
            body = "\n".join(lines if verbose else [line for line in lines if line[1] == "-"])
            return self._text(request, 503, body + "\nreadyz check failed\n")
        if verbose:
            return self._text(request, 200, "\n".join(lines) + "\nreadyz check passed\n")
        return self._text(request, 200, "ok\n")

    @app.route("/metrics", methods=["GET", "HEAD"])
    async def metrics_text(self, request):
        if self.access is not None and self.access.enabled:
            try:
                identity = await self.access.identify(request)
            except Unauthenticated as refused:
                challenge = self.access.challenge()
                if challenge is not None:
                    request.setHeader("WWW-Authenticate", challenge)
                return self._problem(request, 401, str(refused))
            request.identity = identity  # for the audit trail
            if not self.access.is_admin(identity):
                return self._problem(request, 403, "/metrics on the API listener is for admins ([auth] admins);"
                                                   " Prometheus scrapes the [metrics] endpoint")
        await self.status.refresh()
        body, content_type = self.metrics.exposition(request.getHeader("accept"))
        return self._text(request, 200, body, content_type)

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        """Only on the [metrics] endpoint: the API listener sends no other path here (SiteRoot)."""
        return self._problem(request, 404, "no such endpoint: /metrics, /livez and /readyz are served here")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        request.setHeader("Allow", "GET, HEAD")
        return self._problem(request, 405, "use GET or HEAD")

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        self.log.failure("internal error answering {uri}", failure, uri=request.uri)
        return self._problem(request, 500, "internal error; the operators have been told (see the daemon log)")
