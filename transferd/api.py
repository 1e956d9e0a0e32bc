"""The REST API: /submitTransfer, /transferStatus, /doneStaging, /cancelTransfer.

The first three endpoints and their status codes are the prototype's
contract.  Every answer is JSON; every error carries {"error": true, "msg"}
with a message a person can act on, and no traceback ever reaches a client.
"""

import json

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from transferd import jobs, validation
from transferd.audit import AuditLog
from transferd.auth.access import Access, Forbidden, Unauthenticated
from transferd.interfaces import IReconfigurable, StoreUnavailable
from transferd.jobs import StagedFile, StageResult
from transferd.pipeline import JobFinished, JobNotFound, authcode_matches
from transferd.scheduler import TooManyWaiting
from transferd.validation import BadRequest

MAX_TEXT = 4096
MAX_FILES = 100_000
# Our JSON bodies are flat objects, or an object holding a list of objects
# (/doneStaging's files); anything nested deeper is refused before parsing.
MAX_JSON_DEPTH = 4


class HTTPError(Exception):
    def __init__(self, code, msg, job_id=None):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.job_id = job_id


def json_depth_exceeds(text, limit):
    """True when the JSON text nests arrays/objects deeper than limit (a linear scan, strings skipped)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _json(request, code, body):
    request.setResponseCode(code)
    request.setHeader("Content-Type", "application/json; charset=utf-8")
    request.setHeader("Cache-Control", "no-store")
    return (json.dumps(body) + "\n").encode("utf-8")


def _error(request, code, msg, job_id=None):
    return _json(request, code, {"job_id": job_id, "error": True, "msg": msg})


async def identify(access, request, action=None):
    """Who is asking (None when authentication is off); also marks the request for the audit trail."""
    request.audit_action = action
    request.identity = await access.identify(request)
    return request.identity


def audit_request(audit, request, code, msg, job_id=None):
    """Record submissions and cancels whatever their outcome, and every 401 or 403 (both APIs)."""
    action = getattr(request, "audit_action", None)
    if action is None and code not in (401, 403):
        return
    identity = getattr(request, "identity", None)
    peer = request.getClientAddress()
    audit.record(
        action or request.path.decode("ascii", "replace").lstrip("/"), code,
        identity.name if identity is not None else None,
        getattr(peer, "host", None) or str(peer), job_id, msg,
    )


async def visible_job(store, access, request, job_id, action, refuse):
    """The job, if it exists (404) and the caller may `action` it (403); refuse(code, msg, job_id) is the error."""
    job = await store.get(job_id)
    if job is None:
        raise refuse(404, f"no job {job_id}", job_id)
    try:
        access.check_job(request.identity, job, action)
    except Forbidden as refused:
        raise refuse(403, str(refused), job_id) from None
    return job


def check_notify_url(notifications, value):
    """A job's notify_url as given (None when absent), or BadRequest (transferd.events.Notifications.check)."""
    if value is None:
        return None
    if notifications is None:
        raise BadRequest("this service sends no per-job webhooks: leave notify_url out")
    return notifications.check(value)


def actor(identity):
    """Who the caller is, in job histories."""
    return identity.name if identity is not None else "anonymous user"


@implementer(IReconfigurable)
class TransferAPI:
    app = Klein()
    log = Logger()

    def __init__(self, store, pipeline, stager, clock, destinations, max_body_bytes, access=None, audit=None,
                 metrics=None, notifications=None):
        self.store = store
        self.notifications = notifications  # transferd.events.Notifications: checks notify_url (None: refused)
        self.metrics = metrics  # transferd.metrics.Metrics: submissions accepted and refused
        self.pipeline = pipeline
        self.stager = stager
        self.clock = clock
        self.destinations = destinations  # validation.DestinationRules
        self.max_body_bytes = max_body_bytes
        self.access = access or Access()
        self.audit = audit or AuditLog()

    def resource(self):
        return self.app.resource()

    def reconfigure(self, config):
        """New [api] max_body_bytes (SIGHUP; transferd.interfaces.IReconfigurable)."""
        self.max_body_bytes = config.api.max_body_bytes

    # -- request parsing --------------------------------------------------

    def _params(self, request, names):
        """The named parameters from a form or JSON body (or the query string), as text."""
        body = request.content.read(self.max_body_bytes + 1) if request.content is not None else b""
        if len(body) > self.max_body_bytes:
            raise HTTPError(413, f"request body is larger than {self.max_body_bytes} bytes")
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if content_type == "application/json":
            try:
                text = body.decode("utf-8")
                if json_depth_exceeds(text, MAX_JSON_DEPTH):
                    raise HTTPError(400, f"JSON request body is nested deeper than {MAX_JSON_DEPTH} levels")
                data = json.loads(text)
            except (UnicodeDecodeError, ValueError):
                raise HTTPError(400, "request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise HTTPError(400, "JSON request body must be an object")
            return {name: data.get(name) for name in names}
        params = {}
        for name in names:
            values = request.args.get(name.encode("ascii"), [])
            if len(values) > 1:
                raise HTTPError(400, f"{name} was given more than once")
            if values:
                try:
                    params[name] = values[0].decode("utf-8")
                except UnicodeDecodeError:
                    raise HTTPError(400, f"{name} is not valid UTF-8") from None
            else:
                params[name] = None
        return params

    def _job_id(self, value):
        if value is None or value == "":
            raise HTTPError(400, "job_id is required")
        if not isinstance(value, str) or not jobs.is_job_id(value):
            raise HTTPError(400, "job_id must be a job id as returned by /submitTransfer (a UUID)")
        return value

    def _identify(self, request, action=None):
        return identify(self.access, request, action)

    def _audit(self, request, code, msg, job_id=None):
        """Every outcome of a submission or cancel passes here: it is audited, and a submission's is counted."""
        audit_request(self.audit, request, code, msg, job_id)
        if self.metrics is not None and getattr(request, "audit_action", None) == "submit":
            if code < 300:
                self.metrics.accepted("legacy")
            else:
                self.metrics.refused("legacy", code)

    def _visible_job(self, request, job_id, action):
        return visible_job(self.store, self.access, request, job_id, action, HTTPError)

    @staticmethod
    def _actor(request):
        return actor(getattr(request, "identity", None))

    @staticmethod
    def _allow(request, *methods):
        if request.method.decode("ascii", "replace") not in methods:
            request.setHeader("Allow", ", ".join(methods))
            raise HTTPError(405, f"use {' or '.join(methods)} for this endpoint")

    # -- endpoints --------------------------------------------------------

    @app.route("/submitTransfer", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def submit_transfer(self, request):
        identity = await self._identify(request, "submit")
        self._allow(request, "POST")
        params = self._params(request, ["product_id", "destination_path", "notify_url"])
        try:
            product_id = validation.product_id(params["product_id"])
            destination = self.destinations.check(params["destination_path"])
            notify_url = check_notify_url(self.notifications, params["notify_url"] or None)
        except BadRequest as error:
            raise HTTPError(400, str(error)) from None
        if await self.stager.check(product_id) is False:
            raise HTTPError(404, f"product {product_id!r} is not in the archive")
        job = jobs.Job(
            job_id=jobs.new_job_id(), product_id=product_id, destination_path=destination,
            submitter=identity.name if identity is not None else None, notify_url=notify_url,
        )
        await self.pipeline.submit(job, identity=identity)
        msg = f"transfer of {product_id} to {destination} accepted"
        self._audit(request, 202, msg, job.job_id)
        return _json(request, 202, {"job_id": job.job_id, "error": False, "msg": msg})

    @app.route("/transferStatus", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def transfer_status(self, request):
        await self._identify(request)
        self._allow(request, "GET", "HEAD")
        job_id = self._job_id(self._query_param(request, "job_id"))
        job = await self._visible_job(request, job_id, "see")
        return _json(request, 200, job.public_view())

    @app.route("/cancelTransfer", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def cancel_transfer(self, request):
        await self._identify(request, "cancel")
        self._allow(request, "POST")
        job_id = self._job_id(self._params(request, ["job_id"])["job_id"])
        await self._visible_job(request, job_id, "cancel")
        try:
            await self.pipeline.cancel(job_id, actor=self._actor(request))
        except JobNotFound:
            raise HTTPError(404, f"no job {job_id}", job_id) from None
        except JobFinished as finished:
            raise HTTPError(409, f"job {job_id} has already ended ({finished.job.status})", job_id) from None
        msg = f"job {job_id} cancelled"
        self._audit(request, 200, msg, job_id)
        return _json(request, 200, {"job_id": job_id, "error": False, "status": jobs.CANCELLED, "msg": msg})

    @app.route("/doneStaging", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def done_staging(self, request):
        self._allow(request, "POST")
        try:
            self.access.check_stager(request)
        except Forbidden as refused:
            raise HTTPError(403, str(refused)) from None
        names = ["job_id", "product_id", "authcode", "success", "staged_to", "path", "msg", "files"]
        params = self._params(request, names)
        job_id = self._job_id(params["job_id"])
        result = self._stage_result(params)
        authcode = params["authcode"]
        if not isinstance(authcode, str) or not authcode or len(authcode) > 256:
            raise HTTPError(400, "authcode is required", job_id)
        job = await self.store.get(job_id)
        if job is None:
            raise HTTPError(404, f"no job {job_id}", job_id)
        if not authcode_matches(authcode, job.stager_callback):
            self.log.warn("job {job_id}: staging report refused: wrong authcode", job_id=job_id)
            raise HTTPError(403, "authcode is not valid for this job", job_id)
        if params["product_id"] != job.product_id:
            raise HTTPError(400, f"product_id does not match job {job_id}", job_id)
        if job.status != jobs.STAGING:
            if self._repeats_recorded(job, result):
                return _json(request, 200, {"job_id": job_id, "error": False, "msg": "staging result already recorded"})
            raise HTTPError(403, f"job {job_id} is no longer waiting for staging ({job.status})", job_id)
        expires = job.time_staging.timestamp() + self.stager.timeout
        if self.clock.seconds() > expires:
            raise HTTPError(403, "authcode has expired; the job will be staged again", job_id)
        if not await self.pipeline.staging_done(job, result, actor=f"the stager at {result.staged_to or 'its callback'}"):
            raise HTTPError(403, f"job {job_id} is no longer waiting for staging", job_id)
        return _json(request, 200, {"job_id": job_id, "error": False, "msg": "staging result recorded"})

    @staticmethod
    def _repeats_recorded(job, result):
        """True when a successful report repeats the one already recorded (a retried callback)."""
        return (
            result.success
            and job.status in (jobs.STAGED, jobs.TRANSFERRING, jobs.SUCCESS)
            and (job.stager_hostname, job.stager_path) == (result.staged_to, result.path)
        )

    def _stage_result(self, params):
        success = params["success"]
        if isinstance(success, str):
            success = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
                success.strip().lower()
            )
        if not isinstance(success, bool):
            raise HTTPError(400, "success must be true or false")
        for name in ("product_id", "staged_to", "path", "msg"):
            value = params[name]
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
                raise HTTPError(400, f"{name} must be text of at most {MAX_TEXT} characters")
        if not params["product_id"]:
            raise HTTPError(400, "product_id is required")
        if success and not (params["staged_to"] and params["path"]):
            raise HTTPError(400, "a successful staging report needs staged_to and path")
        return StageResult(
            success=success,
            msg=params["msg"] or "",
            staged_to=params["staged_to"],
            path=params["path"],
            files=self._files(params["files"]),
        )

    @staticmethod
    def _files(value):
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise HTTPError(400, "files must be a JSON list of {path, size, checksum}") from None
        if not isinstance(value, list) or len(value) > MAX_FILES:
            raise HTTPError(400, f"files must be a list of at most {MAX_FILES} entries")
        files = []
        for entry in value:
            if not isinstance(entry, dict) or set(entry) - {"path", "size", "checksum"}:
                raise HTTPError(400, "each entry of files must be an object with path, size and checksum")
            path, size, checksum = entry.get("path"), entry.get("size"), entry.get("checksum")
            if (
                not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/")
                or "\x00" in path or len(path) > MAX_TEXT
            ):
                raise HTTPError(400, "each file path must be a relative path without '..'")
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
                raise HTTPError(400, "file sizes must be whole numbers of bytes")
            if checksum is not None and (not isinstance(checksum, str) or len(checksum) > 128):
                raise HTTPError(400, "file checksums must be short text such as adler32:0a1b2c3d")
            files.append(StagedFile(path=path, size=size, checksum=checksum))
        return tuple(files)

    @staticmethod
    def _query_param(request, name):
        values = request.args.get(name.encode("ascii"), [])
        if len(values) > 1:
            raise HTTPError(400, f"{name} was given more than once")
        try:
            return values[0].decode("utf-8") if values else None
        except UnicodeDecodeError:
            raise HTTPError(400, f"{name} is not valid UTF-8") from None

    # -- errors -------------------------------------------------------------

    @app.handle_errors(HTTPError)
    def http_error(self, request, failure):
        error = failure.value
        self._audit(request, error.code, error.msg, error.job_id)
        return _error(request, error.code, error.msg, error.job_id)

    @app.handle_errors(Unauthenticated)
    def unauthenticated(self, request, failure):
        challenge = self.access.challenge()
        if challenge is not None:
            request.setHeader("WWW-Authenticate", challenge)
        self._audit(request, 401, str(failure.value))
        return _error(request, 401, str(failure.value))

    @app.handle_errors(StoreUnavailable)
    def store_unavailable(self, request, failure):
        """Our database is away (the store logs it, and says so at once while it lasts): try again soon."""
        request.setHeader("Retry-After", str(failure.value.retry_after))
        msg = f"the job store is unavailable right now; try again in {failure.value.retry_after} seconds"
        self._audit(request, 503, msg)
        return _error(request, 503, msg)

    @app.handle_errors(TooManyWaiting)
    def too_many_waiting(self, request, failure):
        """[limits] max_waiting_per_submitter: the submitter has enough jobs waiting; nothing was created."""
        request.setHeader("Retry-After", f"{failure.value.retry_after:.0f}")
        self._audit(request, 429, str(failure.value))
        return _error(request, 429, str(failure.value))

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        return _error(request, 404, "no such endpoint: use /submitTransfer, /transferStatus, "
                                    "/cancelTransfer or /doneStaging")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        return _error(request, 405, "method not allowed")

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        self.log.failure("internal error answering {uri}", failure, uri=request.uri)
        msg = "internal error; the operators have been told (see the daemon log)"
        self._audit(request, 500, msg)
        return _error(request, 500, msg)
