"""The v1 JSON API under /api/v1: batches, listings, history, why a job waits, bulk cancel (docs/api.md).

Its OpenAPI 3.1 document is transferd/openapi_v1.json, served at
/api/v1/openapi.json; tests/test_api_v1_openapi.py keeps it and the routes
here in step.  Authentication and the rules on jobs are those of the
prototype's endpoints (transferd.auth.access).  Every error is an RFC 9457
problem (application/problem+json), never a traceback; the prototype's
endpoints (transferd.api) keep their own contract.
"""

import base64
import binascii
import dataclasses
import json
import os
import statistics
from datetime import datetime, timedelta, timezone
from http import HTTPStatus

from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from transferd import jobs, leases, validation
from transferd.api import actor, audit_request, check_notify_url, identify, visible_job
from transferd.audit import AuditLog
from transferd.auth.access import Access, Unauthenticated
from transferd.interfaces import IReconfigurable, StoreUnavailable
from transferd.pipeline import JobFinished, JobNotFound
from transferd.scheduler import TooManyWaiting
from transferd.store.sql import SubmissionExists
from transferd.validation import BadRequest

PREFIX = "/api/v1"
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi_v1.json")

MAX_TEXT = 255  # label, submission_id
MAX_METADATA_BYTES = 16384  # a job's metadata object, JSON-encoded
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
STREAM_PAGE = 500  # jobs read per query while streaming NDJSON
CANCEL_PAGE = 100  # jobs cancelled at once by POST /jobs/cancel
ETA_WINDOW = 86400.0  # seconds: similar jobs submitted this recently count for the ETA
ETA_SAMPLES = 50  # at most this many of them

ITEM_KEYS = frozenset({"product_id", "destination_path", "priority", "label", "metadata", "notify_url"})
FILTER_KEYS = ("status", "product_id", "label", "destination_host", "submitter", "submitted_after",
               "submitted_before")
LIST_KEYS = frozenset(FILTER_KEYS + ("updated_after", "limit", "cursor"))
CANCEL_KEYS = frozenset(FILTER_KEYS + ("job_ids",))
HISTORY_FIELDS = ("kind", "old_status", "new_status", "time", "actor", "reason")
# The column holding the time a job entered each active state (for the ETA).
ENTERED = {jobs.STAGING: "time_staging", jobs.STAGED: "time_staged", jobs.TRANSFERRING: "time_transferring"}

EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)

JSON = "application/json"
PROBLEM = "application/problem+json"
NDJSON = "application/x-ndjson"


class Problem(Exception):
    """An RFC 9457 problem: the HTTP status and a detail a person can act on."""

    def __init__(self, status, detail, job_id=None, headers=None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.job_id = job_id
        self.headers = headers or {}


def problem(status, detail):
    """The problem details object (also each refused item of a batch)."""
    return {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}


def _iso(moment):
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if moment is not None else None


def _moment(name, text):
    """An ISO 8601 time with a zone, as UTC (clamped to 1970..9999: no job lies outside); Problem 400 otherwise."""
    example = "e.g. 2026-12-02T10:00:00Z"
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise Problem(400, f"{name} must be an ISO 8601 time, {example}") from None
    if value.tzinfo is None:
        raise Problem(400, f"{name} needs a time zone: add Z for UTC, {example}")
    try:
        value = value.astimezone(timezone.utc)
    except OverflowError:  # the zone moves it past year 1 or 9999
        value = LATEST if value.year > 1 else EARLIEST
    return min(max(value, EARLIEST), LATEST)


def encode_cursor(job):
    """The opaque cursor after job: its place in the listing order, (time_submitted, job_id)."""
    text = json.dumps([_iso(job.time_submitted), job.job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode("ascii")).decode("ascii").rstrip("=")


def decode_cursor(text):
    """(time_submitted or None, job_id) from a cursor; Problem 400 for anything this server did not give."""
    refused = Problem(400, "cursor is not one this server gave: pass the previous page's next as it is")
    try:
        moment, job_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError, binascii.Error):
        raise refused from None
    if not isinstance(job_id, str) or not jobs.is_job_id(job_id) or not (moment is None or isinstance(moment, str)):
        raise refused
    try:
        return (_moment("cursor", moment) if moment is not None else None), job_id
    except Problem:
        raise refused from None


def _wants_ndjson(request):
    """True when the Accept header asks for NDJSON (with a q above 0)."""
    for entry in (request.getHeader("accept") or "").split(","):
        media, *params = [part.strip().lower() for part in entry.split(";")]
        if media == NDJSON and not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            return True
    return False


@implementer(IPushProducer)
class _Backpressure:
    """Registered with a streaming response: writable() waits while the client's connection is full."""

    def __init__(self):
        self._paused = False
        self._resumed = None

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    stopProducing = resumeProducing  # the connection is gone: Klein cancels the stream

    def writable(self):
        if not self._paused:
            return defer.succeed(None)
        self._resumed = defer.Deferred()
        return self._resumed


class SiteRoot(Resource):
    """The site's root: /api/v1 and below to the v1 API, the operator's endpoints (OPERATIONS_PATHS) to
    operations (transferd.health), the dashboard's pages and assets (DASHBOARD_PATHS, DASHBOARD_PREFIXES) to
    the dashboard (transferd.dashboard), every other path to the prototype's endpoints."""

    isLeaf = True
    OPERATIONS_PATHS = frozenset({b"/livez", b"/readyz", b"/metrics"})
    DASHBOARD_PATHS = frozenset({b"/", b"/jobs", b"/errors"})
    DASHBOARD_PREFIXES = (b"/jobs/", b"/static/")

    def __init__(self, legacy, v1, operations, dashboard=None):
        super().__init__()
        self.legacy = legacy
        self.v1 = v1
        self.operations = operations
        self.dashboard = dashboard

    def render(self, request):
        path = request.path
        if path == PREFIX.encode() or path.startswith(PREFIX.encode() + b"/"):
            return self.v1.render(request)
        if path in self.OPERATIONS_PATHS:
            return self.operations.render(request)
        if self.dashboard is not None and (path in self.DASHBOARD_PATHS or path.startswith(self.DASHBOARD_PREFIXES)):
            return self.dashboard.render(request)
        return self.legacy.render(request)


@implementer(IReconfigurable)
class APIv1:
    app = Klein()
    log = Logger()

    def __init__(self, store, pipeline, stager, mover, clock, destinations, access=None, audit=None,
                 max_body_bytes=65536, max_batch=10000, max_batch_bytes=16777216, metrics=None, notifications=None,
                 fleet=None, scheduler=None):
        self.store = store
        self.scheduler = scheduler  # transferd.scheduler.Scheduler: why a job free to release still waits
        self.fleet = fleet  # transferd.fleet.Fleet: /api/v1/daemons (None: no such endpoint)
        self.notifications = notifications  # transferd.events.Notifications: checks notify_url (None: refused)
        self.metrics = metrics  # transferd.metrics.Metrics: jobs accepted, jobs and requests refused
        self.pipeline = pipeline
        self.stager = stager
        self.mover = mover
        self.clock = clock
        self.destinations = destinations  # validation.DestinationRules
        self.access = access or Access()
        self.audit = audit or AuditLog()
        self.max_body_bytes = max_body_bytes
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        with open(OPENAPI_PATH, "rb") as handle:
            self.openapi = handle.read()

    def resource(self):
        return self.app.resource()

    def reconfigure(self, config):
        """New [api] max_body_bytes, max_batch and max_batch_bytes, together (SIGHUP)."""
        api = config.api
        self.max_body_bytes, self.max_batch, self.max_batch_bytes = api.max_body_bytes, api.max_batch, api.max_batch_bytes

    # -- who is asking ----------------------------------------------------------

    def sees_all(self, identity):
        """Whether identity sees every job (an admin, or no authentication): the dashboard follows it too."""
        return not self.access.enabled or self.access.is_admin(identity)

    def own_submitter(self, identity):
        """The submitter whose jobs identity sees: None (everyone's) for admins and without authentication."""
        return self._own_filter(identity, None)

    def _own_filter(self, identity, submitter):
        """The submitter a listing or bulk cancel is limited to: anyone's for admins, else the caller's own."""
        if self.sees_all(identity):
            return submitter
        if submitter is not None and submitter != identity.name:
            raise Problem(403, "only admins may name another submitter; leave submitter out to see your own jobs")
        return identity.name

    async def _visible_job(self, request, job_id, action):
        """The job (400 for a malformed id, 404 unless it exists, 403 unless the caller may `action` it)."""
        if not jobs.is_job_id(job_id):
            raise Problem(400, "job_id must be a job id as returned by POST /api/v1/jobs (a UUID)")
        return await visible_job(self.store, self.access, request, job_id, action, Problem)

    # -- request parsing ---------------------------------------------------------

    def _body(self, request, limit):
        """The JSON object in the request body: 415, 413, 400 or 422 problems otherwise."""
        content_type = (request.getHeader("content-type") or "").split(";")
        params = [param.strip().lower().replace(" ", "") for param in content_type[1:]]
        if content_type[0].strip().lower() != JSON or any(
                p.startswith("charset=") and p not in ("charset=utf-8", 'charset="utf-8"') for p in params):
            raise Problem(415, "send the body as JSON, with Content-Type: application/json (UTF-8)")
        body = request.content.read(limit + 1) if request.content is not None else b""
        if len(body) > limit:
            raise Problem(413, f"request body is larger than {limit} bytes")
        try:
            data = json.loads(body.decode("utf-8"))
        except RecursionError:
            raise Problem(400, "request body is nested too deeply") from None
        except (UnicodeDecodeError, ValueError):
            raise Problem(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise Problem(422, "the request body must be a JSON object")
        return data

    @staticmethod
    def _query(request, allowed):
        """{name: text} of the query string; Problem 400 for unknown, repeated or non-UTF-8 parameters."""
        params = {}
        for raw, values in request.args.items():
            try:
                name = raw.decode("utf-8")
                texts = [value.decode("utf-8") for value in values]
            except UnicodeDecodeError:
                raise Problem(400, "query parameters must be UTF-8") from None
            if name not in allowed:
                raise Problem(400, f"unknown parameter {name!r} (known: {', '.join(sorted(allowed))})")
            if len(texts) > 1:
                raise Problem(400, f"{name} was given more than once")
            params[name] = texts[0]
        return params

    @staticmethod
    def _text(name, value, limit=MAX_TEXT):
        if not isinstance(value, str) or not value or len(value) > limit or validation.CONTROL.search(value):
            raise Problem(422 if not isinstance(value, str) else 400,
                          f"{name} must be text of 1 to {limit} characters without control characters")
        return value

    def _filter(self, identity, params, job_ids=()):
        """A jobs.JobFilter from text parameters (the list's query or the bulk cancel's body)."""
        statuses = ()
        if params.get("status") is not None:
            statuses = tuple(dict.fromkeys(s.strip().upper() for s in self._text("status", params["status"], 1000)
                                           .split(",")))
            unknown = [s for s in statuses if s not in jobs.STATES]
            if unknown:
                raise Problem(400, f"status {', '.join(unknown) or '(empty)'} is not a job state"
                                   f" (states: {', '.join(jobs.STATES)})")
        texts = {name: self._text(name, params[name], 1000) if params.get(name) is not None else None
                 for name in ("product_id", "label", "destination_host", "submitter")}
        times = {name: _moment(name, params[name]) if params.get(name) is not None else None
                 for name in ("submitted_after", "submitted_before", "updated_after")}
        return jobs.JobFilter(
            statuses=statuses, product_id=texts["product_id"], label=texts["label"],
            destination_host=texts["destination_host"].lower() if texts["destination_host"] else None,
            submitter=self._own_filter(identity, texts["submitter"]), job_ids=tuple(job_ids), **times,
        )

    # -- POST /api/v1/jobs ----------------------------------------------------------

    @app.route(PREFIX + "/jobs", methods=["POST"])
    async def submit(self, request):
        identity = await identify(self.access, request, "submit")
        body = self._body(request, self.max_batch_bytes)
        unknown = set(body) - {"jobs", "submission_id"}
        if unknown:
            raise Problem(422, f"unknown field(s) {', '.join(sorted(unknown))}: send jobs and, optionally,"
                               " submission_id")
        items = body.get("jobs")
        if not isinstance(items, list) or not items:
            raise Problem(422, "jobs must be a list of at least one job: {product_id, destination_path, ...}")
        if len(items) > self.max_batch:
            raise Problem(413, f"at most {self.max_batch} jobs per request; this one has {len(items)}:"
                               " split it into several")
        submission_id = body.get("submission_id")
        if submission_id is not None:
            self._text("submission_id", submission_id)
        submitter = identity.name if identity is not None else None
        if submission_id is not None:
            stored = await self.store.submission(submitter, submission_id)
            if stored is not None:
                return self._repeated(request, stored)
        results, new_jobs = await self._accept(items, submitter)
        answer = {"submission_id": submission_id, "accepted": len(new_jobs), "refused": len(items) - len(new_jobs),
                  "results": results}
        try:
            await self.pipeline.submit_many(
                new_jobs, actor(identity), identity=identity,
                submission=jobs.Submission(submitter, submission_id, answer) if submission_id is not None else None)
        except SubmissionExists:  # the same batch, sent again while the first was being committed
            return self._repeated(request, await self.store.submission(submitter, submission_id))
        except TooManyWaiting as error:  # nothing was created: the whole batch may come again later
            raise Problem(429, str(error), headers={"Retry-After": f"{error.retry_after:.0f}"}) from None
        if self.metrics is not None:
            self.metrics.accepted("v1", len(new_jobs))
            for result in results:
                if "error" in result:
                    self.metrics.refused("v1", result["error"]["status"])
        audit_request(self.audit, request, 200, f"batch of {len(items)}: {answer['accepted']} accepted, {answer['refused']} refused"
                    + (f" (submission_id {submission_id})" if submission_id is not None else ""))
        return self._json(request, 200, answer)

    def _repeated(self, request, answer):
        audit_request(self.audit, request, 200, f"batch repeated: submission_id {answer['submission_id']} answered as first")
        return self._json(request, 200, answer)

    async def _accept(self, items, submitter):
        """(per-item results, the new Jobs): each item checked on its own, the stager asked once per product."""
        results, candidates = [], []
        for index, item in enumerate(items):
            try:
                candidates.append((index, self._job(item, submitter)))
                results.append(None)
            except Problem as refused:
                results.append({"index": index, "error": problem(refused.status, refused.detail)})
        products = {job.product_id for _, job in candidates}
        known = dict(zip(products, await defer.gatherResults([self.stager.check(p) for p in products])))
        new_jobs = []
        for index, job in candidates:
            if known[job.product_id] is False:
                results[index] = {"index": index, "error": problem(404, f"product {job.product_id!r} is not in"
                                                                        " the archive")}
            else:
                results[index] = {"index": index, "job_id": job.job_id}
                new_jobs.append(job)
        return results, new_jobs

    def _job(self, item, submitter):
        """A new Job from one item of a batch; Problem 400 saying what is wrong with it."""
        if not isinstance(item, dict):
            raise Problem(400, "each job must be an object with product_id and destination_path")
        unknown = set(item) - ITEM_KEYS
        if unknown:
            raise Problem(400, f"unknown field(s) {', '.join(sorted(unknown))}: a job has"
                               f" {', '.join(sorted(ITEM_KEYS))}")
        try:
            product_id = validation.product_id(item.get("product_id"))
            destination = self.destinations.check(item.get("destination_path"))
            notify_url = check_notify_url(self.notifications, item.get("notify_url"))
        except BadRequest as error:
            raise Problem(400, str(error)) from None
        priority = item.get("priority", jobs.DEFAULT_PRIORITY)
        if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 5:
            raise Problem(400, "priority must be a whole number from 1 (lowest) to 5 (highest)")
        label = item.get("label")
        if label is not None:
            try:
                self._text("label", label)
            except Problem as refused:
                raise Problem(400, refused.detail) from None
        metadata = item.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise Problem(400, "metadata must be a JSON object")
            metadata = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))
            if len(metadata.encode("utf-8")) > MAX_METADATA_BYTES:
                raise Problem(400, f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return jobs.Job(job_id=jobs.new_job_id(), product_id=product_id, destination_path=destination,
                        submitter=submitter, priority=priority, label=label, metadata=metadata,
                        notify_url=notify_url)

    # -- GET /api/v1/jobs --------------------------------------------------------------

    @app.route(PREFIX + "/jobs", methods=["GET"])
    async def list_jobs(self, request):
        identity = await identify(self.access, request)
        params = self._query(request, LIST_KEYS)
        if _wants_ndjson(request):
            job_filter = self._filter(identity, params)
            if "limit" in params or "cursor" in params:
                raise Problem(400, "NDJSON streams every matching job: leave out limit and cursor")
            return await self._stream(request, job_filter)
        return self._json(request, 200, await self.page(identity, params))

    async def page(self, identity, params):
        """{"jobs": views, "next": cursor or None}: one page of GET /api/v1/jobs for these text parameters
        (the dashboard's job list too).  Problem 400 or 403 for parameters this caller may not give."""
        job_filter = self._filter(identity, params)
        limit = params.get("limit", str(DEFAULT_LIMIT))
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_LIMIT):
            raise Problem(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
        limit = int(limit)
        after = decode_cursor(params["cursor"]) if "cursor" in params else None
        page = await self.store.list_jobs(job_filter, limit + 1, after)
        following = encode_cursor(page[limit - 1]) if len(page) > limit else None
        return {"jobs": [job.public_view(v1=True) for job in page[:limit]], "next": following}

    async def _stream(self, request, job_filter):
        """Every matching job as one JSON line, STREAM_PAGE at a time, waiting while the client's connection is full.

        The first page is read before the status line goes out, so a store
        that is away gets its 503; later, the answer can only be cut short.
        """
        page = await self.store.list_jobs(job_filter, STREAM_PAGE)
        request.setResponseCode(200)
        request.setHeader("Content-Type", NDJSON)
        request.setHeader("Cache-Control", "no-store")
        backpressure = _Backpressure()
        request.registerProducer(backpressure, True)
        try:
            while True:
                if page:
                    request.write(b"".join(json.dumps(job.public_view(v1=True)).encode("utf-8") + b"\n"
                                           for job in page))
                if len(page) < STREAM_PAGE:
                    return b""
                await backpressure.writable()
                try:
                    page = await self.store.list_jobs(job_filter, STREAM_PAGE, (page[-1].time_submitted,
                                                                                page[-1].job_id))
                except ConnectionError as error:
                    self.log.warn("NDJSON listing cut short: the job store is unavailable ({error})", error=error)
                    request.channel.transport.abortConnection()  # no last chunk: the client sees it is cut short
                    return None
        finally:
            if request.channel is not None:  # None once the client has gone
                request.unregisterProducer()

    # -- GET and DELETE /api/v1/jobs/{job_id} --------------------------------------------

    @app.route(PREFIX + "/jobs/<job_id>", methods=["GET"])
    async def job(self, request, job_id):
        await identify(self.access, request)
        return self._json(request, 200, await self.detail(request, job_id))

    async def detail(self, request, job_id):
        """The view of GET /api/v1/jobs/{job_id} (the dashboard's job page too), for the caller identified already."""
        job = await self._visible_job(request, job_id, "see")
        now = self.clock.seconds()
        history = await self.store.events(job_id)
        view = job.public_view(v1=True)
        view["history"] = [{name: _iso(event[name]) if name == "time" else event[name] for name in HISTORY_FIELDS}
                           for event in history]
        view["waiting_for"], ahead = await self._waiting_for(job, now)
        view["eta"] = _iso(await self._eta(job, now, ahead))
        return view

    @app.route(PREFIX + "/jobs/<job_id>", methods=["DELETE"])
    async def cancel(self, request, job_id):
        identity = await identify(self.access, request, "cancel")
        await self._visible_job(request, job_id, "cancel")
        try:
            await self.pipeline.cancel(job_id, actor=actor(identity))
        except JobNotFound:
            raise Problem(404, f"no job {job_id}", job_id) from None
        except JobFinished as finished:
            raise Problem(409, f"job {job_id} has already ended ({finished.job.status})", job_id) from None
        audit_request(self.audit, request, 200, f"job {job_id} cancelled", job_id)
        return self._json(request, 200, (await self.store.get(job_id)).public_view(v1=True))

    # -- POST /api/v1/jobs/cancel ------------------------------------------------------

    @app.route(PREFIX + "/jobs/cancel", methods=["POST"])
    async def cancel_many(self, request):
        identity = await identify(self.access, request, "cancel")
        body = self._body(request, self.max_body_bytes)
        unknown = set(body) - CANCEL_KEYS
        if unknown:
            raise Problem(422, f"unknown field(s) {', '.join(sorted(unknown))} (a filter has"
                               f" {', '.join(sorted(CANCEL_KEYS))})")
        if not body:
            raise Problem(422, "name at least one of " + ", ".join(sorted(CANCEL_KEYS)) + ": an empty filter"
                               " would cancel every job")
        job_ids = body.get("job_ids", [])
        if (not isinstance(job_ids, list) or not all(isinstance(j, str) and jobs.is_job_id(j) for j in job_ids)
                or len(job_ids) > self.max_batch or ("job_ids" in body and not job_ids)):
            raise Problem(422, f"job_ids must be a list of 1 to {self.max_batch} job ids")
        for name in FILTER_KEYS:
            if name in body and not isinstance(body[name], str):
                raise Problem(422, f"{name} must be text, as in the query of GET /api/v1/jobs")
        job_filter = self._filter(identity, body, job_ids)
        active = tuple(s for s in (job_filter.statuses or jobs.ACTIVE) if s in jobs.ACTIVE)
        cancelled = []
        if active:
            cancelled = await self._cancel_all(dataclasses.replace(job_filter, statuses=active), identity)
        audit_request(self.audit, request, 200, f"cancelled {len(cancelled)} job(s) matching a filter")
        return self._json(request, 200, {"cancelled": len(cancelled), "job_ids": cancelled})

    async def _cancel_all(self, job_filter, identity):
        """Cancel every job the filter matches, CANCEL_PAGE at a time; the ids of those this call cancelled."""
        cancelled, after = [], None
        while True:
            page = await self.store.list_jobs(job_filter, CANCEL_PAGE, after)
            done = await defer.gatherResults([defer.Deferred.fromCoroutine(self._cancel_one(job, identity))
                                              for job in page])
            cancelled += [job.job_id for job, ok in zip(page, done) if ok]
            if len(page) < CANCEL_PAGE:
                return cancelled
            after = (page[-1].time_submitted, page[-1].job_id)

    async def _cancel_one(self, job, identity):
        try:
            await self.pipeline.cancel(job.job_id, actor=actor(identity))
        except (JobNotFound, JobFinished):  # it ended (or went) while we were at it
            return False
        return True

    # -- the fleet: /api/v1/daemons (admins only) -------------------------------------------------

    async def _admin_fleet(self, request, action=None):
        identity = await identify(self.access, request, action)
        self._query(request, frozenset())
        if not self.sees_all(identity):
            raise Problem(403, "only admins ([auth] admins) may see and drain the daemons")
        if self.fleet is None:
            raise Problem(404, "this transferd keeps no daemons table")
        return identity

    @app.route(PREFIX + "/daemons", methods=["GET"])
    async def daemons(self, request):
        await self._admin_fleet(request)
        return self._json(request, 200, await self.fleet.status())

    @app.route(PREFIX + "/daemons/<name>/drain", methods=["PUT"])
    async def drain(self, request, name):
        return await self._set_drain(request, name, True)

    @app.route(PREFIX + "/daemons/<name>/drain", methods=["DELETE"])
    async def undrain(self, request, name):
        return await self._set_drain(request, name, False)

    async def _set_drain(self, request, name, drain):
        await self._admin_fleet(request, "drain" if drain else "undrain")
        views = await self.fleet.set_drain(name, drain) if len(name) <= 255 else []
        if not views:
            raise Problem(404, f"no daemon {name!r}: name a host or a daemon_id of GET {PREFIX}/daemons")
        what = "drained" if drain else "undrained"
        audit_request(self.audit, request, 200, f"{what} {', '.join(view['daemon_id'] for view in views)}")
        return self._json(request, 200, {"daemons": views})

    # -- whoami, the document ----------------------------------------------------------------

    @app.route(PREFIX + "/whoami", methods=["GET"])
    async def whoami(self, request):
        identity = await identify(self.access, request)
        return self._json(request, 200, {
            "identity": identity.name if identity is not None else None,
            "method": identity.method if identity is not None else None,
            "admin": self.sees_all(identity),
            # The secret that signs the webhooks of this caller's notify_url (absent when there are none).
            **({"webhook_secret": self.notifications.secret_for(identity.name if identity is not None else None)}
               if self.notifications is not None and self.notifications.enabled else {}),
        })

    @app.route(PREFIX + "/openapi.json", methods=["GET"])
    def openapi_document(self, request):
        request.setHeader("Content-Type", JSON)
        return self.openapi

    # -- why a job waits, and until when ------------------------------------------------------

    async def _waiting_for(self, job, now):
        """({"reason", "message"} or None when the job has ended, the number of jobs ahead in its queue or None)."""
        if job.terminal:
            return None, None
        lease_until = job.lease_until or 0
        worked = job.lease_owner not in (None, leases.IN_QUEUE) and lease_until > now
        waits = job.lease_owner is None and lease_until > now
        if job.status in (jobs.SUBMITTED, jobs.STAGED) and job.lease_until is None and self.scheduler is not None:
            return await self.scheduler.why_waiting(job)  # the scheduler has not released it: fair share or a limit
        if job.status == jobs.SUBMITTED and not worked:
            ahead = await self._ahead(jobs.SUBMITTED, "time_submitted", job.time_submitted)
            return _why("queued", f"queued for staging: {ahead} job(s) ahead"), ahead
        if job.status == jobs.STAGED and not worked and not waits:
            ahead = await self._ahead(jobs.STAGED, "time_updated", job.time_updated)
            return _why("queued", f"queued for transfer: {ahead} job(s) ahead"), ahead
        if job.status == jobs.SUBMITTED and worked:
            return _why("staging_starting", "being handed to the stager"), None
        if job.status in (jobs.SUBMITTED, jobs.STAGING):
            return self._staging(job, now, worked, waits), None
        if job.status == jobs.STAGED:
            if worked:
                return _why("transfer_starting", "being handed to the transfer service"), None
            return _why("transfer_retry", f"the transfer service is unavailable; trying again in"
                                          f" {lease_until - now:.0f} s"), None
        return _why("transfer_active", self._transfer(job)), None

    async def _ahead(self, status, column, moment):
        """Jobs in status that entered it before moment or at it (a batch's jobs count as ahead of each other), but one."""
        return max(0, await self.store.count_before(status, column, moment + timedelta(microseconds=1)) - 1)

    def _staging(self, job, now, worked, waits):
        attempt = f"staging attempt {max(job.stage_attempts, 1)} of {self.stager.max_attempts}"
        if worked:
            return _why("staging", f"{attempt} in progress")
        started = job.time_staging.timestamp() if job.time_staging is not None else now
        if waits and job.lease_until < started + self.stager.timeout - 1:
            return _why("stager_retry", f"{attempt}: the stager is unavailable, retry in {job.lease_until - now:.0f} s")
        if waits:
            request = f" (request {job.stager_request})" if job.stager_request else ""
            return _why("staging", f"{attempt}: the stager is at work{request}; it has until"
                                   f" {_iso(jobs.utc_from_seconds(job.lease_until))}")
        if job.stage_attempts >= self.stager.max_attempts:
            return _why("staging_timed_out", f"{attempt} timed out; no attempt is left, the job is about to end")
        return _why("staging_timed_out", f"{attempt} timed out; it is about to be staged again")

    @staticmethod
    def _transfer(job):
        if job.fts_jobid and job.fts_details:
            try:
                details = json.loads(job.fts_details)
                files = [f for f in details.get("files") or [] if isinstance(f, dict)]
                done = sum(f.get("file_state") == "FINISHED" for f in files)
                state = f"FTS job {details.get('job_state') or 'SUBMITTED'}"
                return f"{state}: {done} of {len(files)} files done" if files else state
            except (ValueError, AttributeError):
                pass
        if job.fts_jobid:
            return f"FTS job {job.fts_jobid} submitted; waiting for its first report"
        return f"transferring to {job.destination_host or 'local storage'}"

    async def _eta(self, job, now, ahead):
        """When the job should end, from similar jobs (same destination host) that succeeded lately; None if unknown.

        Queued for staging: now + ahead / their rate of success + their median
        time from staging to success.  In another active state: the time it
        entered that state + their median time from that state to success.
        """
        if job.terminal or job.destination_host is None:
            return None
        since = jobs.utc_from_seconds(now - ETA_WINDOW)
        similar = await self.store.recent_successes(job.destination_host, since, ETA_SAMPLES)
        entered = ENTERED.get(job.status, "time_staging")
        spans = [(done.time_success - getattr(done, entered)).total_seconds()
                 for done in similar if done.time_success is not None and getattr(done, entered) is not None]
        if len(spans) < 2:
            return None
        remaining = statistics.median(spans)
        if job.status == jobs.SUBMITTED:
            ends = sorted(done.time_success.timestamp() for done in similar if done.time_success is not None)
            if ends[-1] <= ends[0]:
                return None
            rate = (len(ends) - 1) / (ends[-1] - ends[0])
            return jobs.utc_from_seconds(now + (ahead or 0) / rate + remaining)
        start = getattr(job, entered)
        return max(jobs.utc_from_seconds(now), start + timedelta(seconds=remaining)) if start else None

    # -- answers and errors ---------------------------------------------------------------------

    @staticmethod
    def _json(request, status, body, content_type=JSON):
        request.setResponseCode(status)
        request.setHeader("Content-Type", content_type)
        request.setHeader("Cache-Control", "no-store")
        return (json.dumps(body) + "\n").encode("utf-8")

    def _problem(self, request, status, detail, job_id=None, headers=None):
        """Every refusal passes here: it is audited, and a refused submission is counted (once per request)."""
        audit_request(self.audit, request, status, detail, job_id)
        if self.metrics is not None and getattr(request, "audit_action", None) == "submit":
            self.metrics.refused("v1", status)
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        return self._json(request, status, problem(status, detail), PROBLEM)

    @app.handle_errors(Problem)
    def refused(self, request, failure):
        error = failure.value
        return self._problem(request, error.status, error.detail, error.job_id, error.headers)

    @app.handle_errors(Unauthenticated)
    def unauthenticated(self, request, failure):
        challenge = self.access.challenge()
        return self._problem(request, 401, str(failure.value),
                             headers={"WWW-Authenticate": challenge} if challenge else None)

    @app.handle_errors(ConnectionError)
    def unavailable(self, request, failure):
        """The job store is away (StoreUnavailable, or a connection error beneath it): try again shortly."""
        self.log.warn("answering 503: {error}", error=failure.value)
        retry_after = getattr(failure.value, "retry_after", StoreUnavailable.retry_after)
        return self._problem(request, 503, f"the job database is unavailable; try again in {retry_after} s",
                             headers={"Retry-After": str(retry_after)})

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        return self._problem(request, 404, f"no such endpoint; the v1 API is described at {PREFIX}/openapi.json")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        allowed = sorted(failure.value.valid_methods or ())
        return self._problem(request, 405, f"use {' or '.join(allowed)} for this endpoint",
                             headers={"Allow": ", ".join(allowed)})

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        self.log.failure("internal error answering {uri}", failure, uri=request.uri)
        return self._problem(request, 500, "internal error; the operators have been told (see the daemon log)")


def _why(reason, message):
    return {"reason": reason, "message": message}
