"""The web dashboard at / (docs/dashboard.md): overview, job list, job page, errors.

Pages are HTML rendered here (transferd.dashboard.views) from the v1 API's
own views and under its own rule: a user sees their own jobs, admins and
loopback without authentication all (APIv1.own_submitter).  The assets are
files of this package (static/, templates/), nothing is fetched from
elsewhere; static/dashboard.js asks /api/v1 whether anything changed, swaps in
the parts of the page that did, and cancels jobs through DELETE /api/v1/jobs/{id}.
"""

import os

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from transferd import __version__, jobs
from transferd.api import audit_request, identify
from transferd.api_v1 import Problem
from transferd.auth.access import Unauthenticated
from transferd.dashboard import views

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ASSETS = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
WINDOWS = {"1h": 3600, "1d": 86400, "7d": 7 * 86400, "30d": 30 * 86400}  # the time windows one may pick
LIST_FILTERS = ("status", "product_id", "label", "destination_host", "submitter")
PAGE_SIZE = 50
FAILURES_READ = 500  # failed jobs read to list one reason class's jobs
POLL_SECONDS = 2  # how often an open page asks /api/v1 whether its jobs changed
# No inline script or style, nothing from another origin, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
                               " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class Dashboard:
    """The pages; api is the site's APIv1, whose views, rules and audit trail they share.

    transferd.api_v1.SiteRoot sends it /, /jobs, /jobs/<job_id>, /errors and /static/<asset>.
    """

    app = Klein()
    log = Logger()

    def __init__(self, api, clock, poll_seconds=POLL_SECONDS):
        self.api = api
        self.store = api.store
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.assets = {}
        for name in ASSETS:
            with open(os.path.join(STATIC, name), "rb") as handle:
                self.assets[name] = handle.read()

    def resource(self):
        return self.app.resource()

    # -- plumbing ----------------------------------------------------------------------

    async def _who(self, request):
        """(identity, submitter whose jobs the caller sees or None for all)."""
        identity = await identify(self.api.access, request)
        return identity, self.api.own_submitter(identity)

    def _page(self, request, view, title, body, identity, status=200, live=True):
        request.setResponseCode(status)
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        request.setHeader("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        since = views.iso(jobs.utc_from_seconds(request.rendered_at)) if hasattr(request, "rendered_at") else None
        return views.page(view, title, body, who=self._identity_line(identity), version=__version__,
                          poll=self.poll_seconds if live and since else None, since=since).encode("utf-8")

    def _identity_line(self, identity):
        if not self.api.access.enabled:
            return "No authentication (loopback): you see every job."
        if identity is None:
            return "Not signed in."
        role = "an admin: you see every job" if self.api.sees_all(identity) else "you see your own jobs"
        return f"Signed in as {identity.name} ({role})."

    def _params(self, request, allowed):
        """{name: text} of the query, empty fields left out (an HTML form sends them); Problem 400 otherwise."""
        return {name: value for name, value in self.api._query(request, frozenset(allowed)).items() if value != ""}

    @staticmethod
    def _window(params, default, allow_all=False):
        """The time window picked (a key of WINDOWS, or "all"); Problem 400 for another."""
        name = params.pop("window", default)
        known = [*WINDOWS, *(["all"] if allow_all else [])]
        if name not in known:
            raise Problem(400, f"window must be one of {', '.join(known)}")
        return name

    def _started(self, request):
        """Remember when the page's data is read: the page's script asks for changes after that."""
        request.rendered_at = self.clock.seconds()
        return request.rendered_at

    # -- the overview -------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    async def overview(self, request):
        identity, submitter = await self._who(request)
        self.api._query(request, frozenset())
        now = self._started(request)
        hour, day = jobs.utc_from_seconds(now - 3600), jobs.utc_from_seconds(now - 86400)
        states = await self.store.count_by_status(submitter)
        last_hour = await self.store.activity(hour, submitter)
        last_day = await self.store.activity(day, submitter)
        hosts = await self.store.counts_by("destination_host", day, submitter)
        stagers = await self.store.counts_by("stager_hostname", day, submitter)
        body = views.overview(states, last_hour, last_day, hosts, stagers)
        return self._page(request, "overview", "Overview", body, identity)

    # -- the job list ---------------------------------------------------------------------

    @app.route("/jobs", methods=["GET", "HEAD"])
    async def job_list(self, request):
        identity, submitter = await self._who(request)
        params = self._params(request, LIST_FILTERS + ("window", "cursor"))
        window = self._window(params, "all", allow_all=True)
        query = dict(params, limit=str(PAGE_SIZE))
        now = self._started(request)
        if window != "all":
            query["submitted_after"] = views.iso(jobs.utc_from_seconds(now - WINDOWS[window]))
        page = await self.api.page(identity, query)
        shown = dict(params, window=window)
        body = views.job_list(page, shown, admin=submitter is None and self.api.access.enabled, windows=WINDOWS)
        return self._page(request, "jobs", "Jobs", body, identity)

    # -- one job --------------------------------------------------------------------------

    @app.route("/jobs/<job_id>", methods=["GET", "HEAD"])
    async def job_page(self, request, job_id):
        identity, _ = await self._who(request)
        self.api._query(request, frozenset())
        self._started(request)
        view = await self.api.detail(request, job_id)
        live = view["status"] not in jobs.TERMINAL
        return self._page(request, "job", f"Job {job_id}", views.job_detail(view), identity, live=live)

    # -- errors ---------------------------------------------------------------------------

    @app.route("/errors", methods=["GET", "HEAD"])
    async def errors(self, request):
        identity, submitter = await self._who(request)
        params = self._params(request, ("window", "reason"))
        window = self._window(params, "1d")
        now = self._started(request)
        since = jobs.utc_from_seconds(now - WINDOWS[window])
        reasons = await self.store.failure_reasons(since, submitter)
        groups = views.group_reasons(reasons)
        chosen = params.get("reason")
        failed = None
        if chosen is not None:
            failed = [job for job in await self.store.recent_failures(since, FAILURES_READ, submitter)
                      if views.reason_class(job.detailed_status) == chosen]
        body = views.errors(groups, window, WINDOWS, chosen, failed)
        return self._page(request, "errors", "Errors", body, identity)

    # -- the assets -----------------------------------------------------------------------

    @app.route("/static/<name>", methods=["GET", "HEAD"])
    def asset(self, request, name):
        if name not in self.assets:
            raise NotFound()
        request.setHeader("Content-Type", ASSETS[name])
        request.setHeader("Cache-Control", "max-age=3600")  # the pages name them with ?v=<version>
        request.setHeader("X-Content-Type-Options", "nosniff")
        return self.assets[name]

    # -- refusals: HTML pages, audited as the API's are -------------------------------------

    def _refusal(self, request, status, detail, headers=None):
        audit_request(self.api.audit, request, status, detail)
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        body = views.refusal(status, detail)
        return self._page(request, "refusal", views.phrase(status), body, getattr(request, "identity", None),
                          status=status, live=False)

    @app.handle_errors(Problem)
    def refused(self, request, failure):
        return self._refusal(request, failure.value.status, failure.value.detail)

    @app.handle_errors(Unauthenticated)
    def unauthenticated(self, request, failure):
        challenge = self.api.access.challenge()
        return self._refusal(request, 401, str(failure.value),
                             {"WWW-Authenticate": challenge} if challenge else None)

    @app.handle_errors(ConnectionError)
    def unavailable(self, request, failure):
        self.log.warn("dashboard answering 503: {error}", error=failure.value)
        return self._refusal(request, 503, "the job database is unavailable; this page tries again by itself"
                                           " when reloaded in a few seconds", {"Retry-After": "5"})

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        return self._refusal(request, 404, "no such page: start from the overview")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        return self._refusal(request, 405, "the dashboard's pages are read with GET", {"Allow": "GET, HEAD"})

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        self.log.failure("dashboard: internal error answering {uri}", failure, uri=request.uri)
        return self._refusal(request, 500, "internal error; the operators have been told (see the daemon log)")

