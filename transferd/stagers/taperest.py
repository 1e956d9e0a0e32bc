"""The WLCG Tape REST API stager (`[stager] backend = taperest`).

It asks a tape system (dCache, CTA/EOS, StoRM...) to bring products to disk
through the WLCG Tape REST API v1, and learns the outcome by polling.

Where the API is (`[stager] url`)
    A URL without a path (``https://tape.example.org:8443`` or with a lone
    ``/``) names the site: the v1 endpoint is discovered from
    ``<url>/.well-known/wlcg-tape-rest-api`` (the entry of ``"endpoints"``
    whose ``"version"`` is ``"v1"``) and cached for the life of the process.
    A URL with a path (``https://tape.example.org:8443/api/v1``) is the
    endpoint itself and is used as it is.

Which file a product is (`[stager] archive_root`)
    For this backend archive_root is the directory of the tape namespace
    that holds the products, and must be absolute: product ``P`` is the one
    file ``<archive_root>/P`` (``/pnfs/example.org/data/meerkat/P``).  One
    product is one file on tape; directory products are not supported here
    (a tape system recalls files, not trees).  The staging result names the
    endpoint's host as ``staged_to``, that path as ``path``, and one staged
    file named after the product (its size is not known: the API does not
    report sizes).

How staging goes
    stage() queues the job.  A batcher sends ``POST <endpoint>/stage`` with
    the files of up to bulk_size jobs at once, as soon as bulk_size are
    waiting or after a short window (0.2 s).  Two jobs for the same file go
    in different requests, so that releasing one never unpins the other's
    copy.  The request id the tape system returns is stored in the job's
    ``stager_request`` column before stage() fires None ("reported later").
    Connection errors, timeouts and 5xx/408/429 answers are retried after
    retry_delay seconds, doubling each time with jitter, up to max_attempts
    requests; then the jobs fail, saying the endpoint could not be reached.
    Any other 4xx answer fails them with its RFC 7807 title and detail (a
    batch of several files refused with 400, 409, 413 or 422 is first sent
    again file by file, so that one bad path, or a batch too large for the
    server, does not fail other people's jobs).

    The poller (services()) runs every poll_interval.  It claims STAGING
    jobs that have a ``stager_request`` with the store's claim_batch, so
    that several daemons share the polling and a restarted daemon resumes
    from the stored request ids; it sends one ``GET <endpoint>/stage/<id>``
    per request, finds each job's file in the answer by path (the order of
    the list means nothing), and reports through
    ``pipeline.staging_done``: COMPLETED (or ``onDisk: true``) stages the
    job, FAILED or CANCELLED fails it with the tape system's error, other
    states wait.  A request the tape system no longer knows (404) fails its
    jobs.  A job is claimed for 0.8 poll_interval, so it is polled about
    once per interval however many daemons poll.

    cancel() sends ``POST <endpoint>/stage/<id>/cancel`` for the job's file,
    release() (once the job has ended) ``POST <endpoint>/release/<id>``; both
    are best effort and never raise.

Credentials
    A bearer token read from token_file (read again whenever the file
    changes), and/or an X.509 client certificate: cert and key as PEM files,
    or a proxy as cert alone (certificate, key and chain in one file), also
    read again when they change.  ca_path (a PEM file or a directory of
    them, such as /etc/grid-security/certificates) is what the server's
    certificate is verified against; without it, the system's trust store.

Known limits: a POST /stage whose answer is lost (timeout) is sent again and
the first request is left to the tape system; a daemon killed between the
answer to POST /stage and the store update leaves its jobs without a request
id, and they are staged again when the stager timeout expires.
"""

import collections
import dataclasses
import json
import os
import posixpath
import random
import re
import uuid
from urllib.parse import quote, urljoin, urlsplit

import treq
from OpenSSL import SSL, crypto
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from transferd import jobs
from transferd.http import describe
from transferd.interfaces import IStager
from transferd.jobs import StagedFile, StageResult
from transferd.stagers.local import is_plain_name
from transferd.tls import WatchedFile, client_tls_policy

WELL_KNOWN = "/.well-known/wlcg-tape-rest-api"
API_VERSION = "v1"
BATCH_WINDOW = 0.2  # seconds a staging request waits for others to share its POST
REQUEST_TIMEOUT = 60.0  # seconds one HTTP exchange (answer and body) may take
POLL_HOLD = 0.8  # a poller holds the jobs it claims for this fraction of poll_interval
POLL_LIMIT = 1000  # jobs claimed per polling cycle
POLL_CONCURRENCY = 8  # GET /stage/<id> in flight at once per poller
MAX_BODY = 16 << 20  # larger answers are refused
RETRYABLE_STATUS = frozenset({408, 425, 429})
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"


class Unreachable(Exception):
    """The endpoint could not be reached, or answered in a way that may pass (5xx, timeout)."""


class Refused(Exception):
    """The endpoint refused the request for good (4xx); the message says why.

    splittable: a batch refused this way may be tried again file by file.
    """

    def __init__(self, message, splittable=False):
        super().__init__(message)
        self.splittable = splittable


@dataclasses.dataclass(frozen=True)
class Answer:
    code: int
    headers: object
    body: bytes

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None

    def problem(self):
        """The RFC 7807 title and detail (or the start of the body) as one sentence."""
        data = self.json()
        if isinstance(data, dict) and (data.get("title") or data.get("detail")):
            pieces = [str(data[key]).strip() for key in ("title", "detail") if data.get(key)]
            return ": ".join(pieces)
        text = self.body.decode("utf-8", "replace").strip()
        return text[:200] if text else "no details given"


@dataclasses.dataclass
class _Waiting:
    """A job waiting for its file to go out in a POST /stage."""

    job: jobs.Job
    path: str
    deferred: defer.Deferred


def normalize(path):
    """Compare tape paths as the servers do: runs of '/' collapsed, '.' and '..' resolved."""
    return posixpath.normpath(re.sub("/+", "/", path)) if path else path


# -- the stager ---------------------------------------------------------------


@implementer(IStager)
class TapeRestStager:
    """Stages products through a WLCG Tape REST API endpoint: bulk requests out, polling for the outcome."""

    log = Logger()

    def __init__(self, url, namespace, store, clock=None, *, reactor=None, bulk_size=100, poll_interval=30.0,
                 timeout=3600.0, max_attempts=3, retry_delay=2.0, token_file=None, tls_policy=None,
                 batch_window=BATCH_WINDOW, request_timeout=REQUEST_TIMEOUT, poll_limit=POLL_LIMIT,
                 poll_concurrency=POLL_CONCURRENCY, name=None):
        """url: the site URL or the endpoint (see the module docstring).
        namespace: the absolute tape directory holding the products.
        store: the IJobStore (request ids are stored there, and polled jobs claimed from it).
        clock: drives batching, retries and polling (default: the reactor).
        reactor: does the network I/O and times it out (default: the global reactor).
        tls_policy: an IPolicyForHTTPS (transferd.tls.ClientTLSPolicy) for https URLs.
        name: names this instance's poller in the store (default: a fresh uuid).
        """
        if reactor is None:
            from twisted.internet import reactor
        self.url = url.rstrip("/")
        self.namespace = normalize(namespace).rstrip("/")
        self.store = store
        self.clock = clock if clock is not None else reactor
        self.reactor = reactor
        self.bulk_size = bulk_size
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.batch_window = batch_window
        self.request_timeout = request_timeout
        self.poll_limit = poll_limit
        self.poll_concurrency = poll_concurrency
        self.poller = name or f"taperest-{uuid.uuid4()}"
        self._token = WatchedFile(token_file) if token_file else None
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = poll_concurrency
        self.tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        agent = Agent(reactor, contextFactory=self.tls_policy, pool=self.pool)
        self.http = treq.client.HTTPClient(agent)
        # A site URL (no path) is discovered; any other URL is the endpoint itself.
        self._endpoint_url = None if urlsplit(self.url).path in ("", "/") else self.url
        self.pipeline = None
        self.polls = 0  # polling cycles finished, for tests and monitoring
        self.accepted = 0  # stage() calls taken into a batch, for tests and monitoring
        self._waiting = []  # of _Waiting, in arrival order
        self._flush_call = None
        self._busy = set()  # Deferreds of work in flight: calls, sleeps, sends
        self._services = []
        self._closed = False
        self._stopping = False  # the daemon is shutting down: take no new work, retry nothing

    @property
    def queued(self):
        """How many stage() calls wait for the next POST /stage."""
        return len(self._waiting)

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """The tape system is not asked at submission: existence is learnt when staging."""
        return defer.succeed(None)

    def path_for(self, product_id):
        """The Tape REST path of a product: <namespace>/<product_id>."""
        return f"{self.namespace}/{product_id}"

    def stage(self, job, authcode):
        """Queue the job's file for the next POST /stage; fire None once its request id is stored.

        The authcode is not needed: the outcome is polled, not called back.
        """
        if self._closed or self._stopping:
            return defer.fail(defer.CancelledError("the Tape REST stager is shutting down"))
        if not is_plain_name(job.product_id):
            return defer.succeed(StageResult(False, f"product id {job.product_id!r} is not a plain name"))
        entry = _Waiting(job, self.path_for(job.product_id), None)
        entry.deferred = defer.Deferred(lambda d: self._drop(entry))
        self._waiting.append(entry)
        self.accepted += 1
        self._schedule()
        return entry.deferred

    async def _cancel(self, job):
        waiting = [entry for entry in self._waiting if entry.job.job_id == job.job_id]
        for entry in waiting:
            self._waiting.remove(entry)
            self._fire(entry, StageResult(False, f"staging of {job.product_id!r} was cancelled"))
        if job.stager_request:
            await self._best_effort("cancel", job, f"/stage/{quote(job.stager_request, safe='')}/cancel",
                                    {"paths": [self.path_for(job.product_id)]})

    def cancel(self, job):
        """Stop staging job: drop it from the next batch, or cancel its file on the tape system."""
        return self._track(defer.Deferred.fromCoroutine(self._cancel(job)))

    def release(self, job):
        """The job has ended: unpin its file on the tape system."""
        if not job.stager_request or not is_plain_name(job.product_id):
            return defer.succeed(None)
        return self._track(defer.Deferred.fromCoroutine(self._best_effort(
            "release", job, f"/release/{quote(job.stager_request, safe='')}",
            {"paths": [self.path_for(job.product_id)]})))

    @defer.inlineCallbacks
    def close(self):
        """Stop the poller, fail the stage() calls still waiting, abort requests in flight, close the pool."""
        self._closed = True
        self._shed_waiting()
        for service in self._services:
            if service.running:
                yield service.stopService()
        for busy in list(self._busy):
            busy.cancel()
        yield self.pool.closeCachedConnections()

    # -- services -----------------------------------------------------------

    def services(self, pipeline):
        """The poller (poll_once every poll_interval, and at start), in a service that stops the intake.

        When the daemon stops, this service stops before the pipeline and
        its queue (it is started after them): stage() calls still waiting
        for a batch fail at once (the jobs are staged again after the
        restart), and no POST is retried, so the queue's stop does not wait
        on the tape system.
        """
        self.pipeline = pipeline
        service = _StagerService(self)
        self._services.append(service)
        return [service]

    def _start_intake(self):
        self._stopping = False

    def _stop_intake(self):
        self._stopping = True
        self._shed_waiting()

    def _shed_waiting(self):
        """Fail the stage() calls that wait for a batch (shutting down)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        waiting, self._waiting = self._waiting, []
        for entry in waiting:
            if not entry.deferred.called:
                entry.deferred.errback(defer.CancelledError("the Tape REST stager is shutting down"))

    # -- batching ---------------------------------------------------------

    def _drop(self, entry):
        """stage()'s Deferred was cancelled: forget the job if its POST has not gone yet."""
        if entry in self._waiting:
            self._waiting.remove(entry)

    def _schedule(self):
        while self._distinct_waiting() >= self.bulk_size:
            self._flush()
        if self._waiting and (self._flush_call is None or not self._flush_call.active()):
            self._flush_call = self.clock.callLater(self.batch_window, self._flush_due)

    def _distinct_waiting(self):
        return len({entry.path for entry in self._waiting})

    def _flush_due(self):
        self._flush_call = None
        while self._waiting and not self._closed:
            self._flush()

    def _flush(self):
        """Send the next batch: up to bulk_size waiting jobs whose files differ."""
        batch, paths, rest = [], set(), []
        for entry in self._waiting:
            if len(batch) < self.bulk_size and entry.path not in paths:
                batch.append(entry)
                paths.add(entry.path)
            else:
                rest.append(entry)
        self._waiting = rest
        if not rest and self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()  # the next job opens a new window
            self._flush_call = None
        if batch:
            self._track(defer.Deferred.fromCoroutine(self._send(batch)))

    async def _send(self, batch):
        """POST /stage for the batch; store the request id on each job, then fire its stage() with None."""
        try:
            request_id = await self._submit([entry.path for entry in batch])
        except Refused as refusal:
            if refusal.splittable and len(batch) > 1:
                self.log.warn("Tape REST endpoint refused a batch of {count} files ({why}); sending them one by one",
                              count=len(batch), why=refusal)
                await defer.gatherResults([defer.Deferred.fromCoroutine(self._send([entry])) for entry in batch],
                                          consumeErrors=True)
                return
            for entry in batch:
                self._fire(entry, StageResult(False, str(refusal)))
            return
        except Exception as error:
            for entry in batch:
                if not entry.deferred.called:
                    entry.deferred.errback(error)
            return
        self.log.info("Tape REST request {request_id}: staging {count} file(s)", request_id=request_id,
                      count=len(batch))
        await defer.gatherResults([defer.Deferred.fromCoroutine(self._record(entry, request_id))
                                   for entry in batch], consumeErrors=True)

    async def _record(self, entry, request_id):
        job = entry.job
        try:
            stored = await self.store.update(job.job_id, jobs.STAGING, {"stager_request": request_id})
        except Exception as error:
            self.log.failure("job {job_id}: could not store Tape REST request id {request_id}",
                             job_id=job.job_id, request_id=request_id)
            if not entry.deferred.called:
                entry.deferred.errback(error)
            return
        if stored:
            self.log.info("job {job_id}: staging {path} in Tape REST request {request_id}",
                          job_id=job.job_id, path=entry.path, request_id=request_id)
        else:
            # Cancelled (or ended) while its POST was in flight: stop the recall again.
            await self._best_effort("cancel", job, f"/stage/{quote(request_id, safe='')}/cancel",
                                    {"paths": [entry.path]})
        self._fire(entry, None)

    @staticmethod
    def _fire(entry, result):
        if not entry.deferred.called:
            entry.deferred.callback(result)

    async def _submit(self, paths):
        """POST /stage with retries; return the request id, raise Refused when it cannot be had."""
        body = {"files": [{"path": path} for path in paths]}
        why = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            try:
                endpoint = await self._endpoint()
                answer = await self._call("POST", endpoint + "/stage", body)
            except Unreachable as error:
                why = str(error)
            else:
                if 200 <= answer.code < 300:
                    return self._request_id(answer)
                if answer.code >= 500 or answer.code in RETRYABLE_STATUS:
                    why = f"HTTP {answer.code}: {answer.problem()}"
                else:
                    raise Refused(
                        f"the Tape REST endpoint {endpoint} refused the staging request "
                        f"(HTTP {answer.code}): {answer.problem()}",
                        splittable=answer.code in (400, 409, 413, 422),
                    )
            if attempt < self.max_attempts:
                if self._stopping or self._closed:
                    raise defer.CancelledError(f"shutting down; POST /stage not retried ({why})")
                delay = self.retry_delay * 2 ** (attempt - 1) * random.uniform(1.0, 1.5)
                self.log.warn("Tape REST POST /stage failed ({why}); attempt {next} in {delay:.1f}s",
                              why=why, next=attempt + 1, delay=delay)
                await self._sleep(delay)
        raise Refused(f"the Tape REST endpoint {self._endpoint_url or self.url} could not be reached after "
                      f"{self.max_attempts} attempt(s): {why}")

    def _request_id(self, answer):
        data = answer.json()
        if isinstance(data, dict) and isinstance(data.get("requestId"), str) and data["requestId"]:
            return data["requestId"]
        location = answer.headers.getRawHeaders(b"location", [b""])[0].decode("utf-8", "replace")
        if location.rstrip("/"):
            return location.rstrip("/").rsplit("/", 1)[-1]
        raise Refused(f"the Tape REST endpoint accepted the staging request (HTTP {answer.code}) "
                      "but gave no request id")

    # -- polling ------------------------------------------------------------

    def poll_once(self):
        """One polling cycle; never fails (a TimerService body)."""
        return self._track(defer.Deferred.fromCoroutine(self._poll_safely()))

    async def _poll_safely(self):
        try:
            await self._poll()
        except defer.CancelledError:
            pass
        except Exception:
            self.log.failure("Tape REST polling cycle failed; the next one will try again")
        finally:
            self.polls += 1

    async def _poll(self):
        if self.pipeline is None or self._closed:
            return
        claimed = await self.store.claim_batch(jobs.STAGING, self.poller, self.poll_interval * POLL_HOLD,
                                               self.poll_limit, having="stager_request")
        requests = collections.defaultdict(list)
        for job in claimed:
            requests[job.stager_request].append(job)
        limit = defer.DeferredSemaphore(self.poll_concurrency)
        await defer.gatherResults(
            [limit.run(lambda rid=rid, group=group: defer.Deferred.fromCoroutine(self._poll_request(rid, group)))
             for rid, group in requests.items()],
            consumeErrors=True,
        )

    async def _poll_request(self, request_id, group):
        """GET one staging request and report every job of it whose file has finished."""
        try:
            endpoint = await self._endpoint()
            answer = await self._call("GET", f"{endpoint}/stage/{quote(request_id, safe='')}")
        except (Unreachable, Refused) as error:
            self.log.warn("Tape REST request {request_id} not polled: {error}", request_id=request_id, error=error)
            return
        except defer.CancelledError:
            return
        if answer.code == 404:
            host = urlsplit(endpoint).hostname
            outcomes = [(job, StageResult(False, f"staging request lost by the tape system ({host} no longer "
                                                 f"knows request {request_id})")) for job in group]
        elif answer.code != 200 or not isinstance(answer.json(), dict):
            self.log.warn("Tape REST request {request_id} not polled: HTTP {code}: {why}",
                          request_id=request_id, code=answer.code, why=answer.problem())
            return
        else:
            files = {}
            for entry in answer.json().get("files") or ():
                if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                    files[normalize(entry["path"])] = entry
            outcomes = []
            for job in group:
                outcome = self._outcome(endpoint, request_id, job, files.get(normalize(self.path_for(job.product_id))))
                if outcome is not None:
                    outcomes.append((job, outcome))
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._report(job, outcome)) for job, outcome in outcomes],
            consumeErrors=True,
        )

    def _outcome(self, endpoint, request_id, job, entry):
        """The StageResult a file's entry means, or None while it is still on its way."""
        path = self.path_for(job.product_id)
        if entry is None:
            return StageResult(False, f"the tape system's request {request_id} does not list {path}")
        state = str(entry.get("state") or "").upper()
        if entry.get("onDisk") is True or state == COMPLETED:
            return StageResult(
                success=True,
                msg=f"recalled from tape (Tape REST request {request_id})",
                staged_to=urlsplit(endpoint).hostname,
                path=path,
                files=(StagedFile(job.product_id),),
            )
        if state in (FAILED, CANCELLED):
            error = str(entry.get("error") or "").strip() or f"the file is {state}"
            return StageResult(False, f"tape recall of {path} {state.lower()}: {error}")
        return None

    async def _report(self, job, outcome):
        try:
            await self.pipeline.staging_done(job, outcome)
        except Exception:
            self.log.failure("job {job_id}: could not record the staging outcome; it will be polled again",
                             job_id=job.job_id)

    # -- HTTP ---------------------------------------------------------------

    async def _endpoint(self):
        """The v1 endpoint URL (no trailing slash), discovered once and cached."""
        if self._endpoint_url is not None:
            return self._endpoint_url
        where = self.url + WELL_KNOWN
        answer = await self._call("GET", where)
        if answer.code >= 500 or answer.code in RETRYABLE_STATUS:
            raise Unreachable(f"discovery at {where} answered HTTP {answer.code}: {answer.problem()}")
        document = answer.json()
        if answer.code != 200 or not isinstance(document, dict):
            raise Refused(f"no WLCG Tape REST API at {where} (HTTP {answer.code}: {answer.problem()})")
        offered = [e for e in document.get("endpoints") or () if isinstance(e, dict)]
        for entry in offered:
            if entry.get("version") == API_VERSION and isinstance(entry.get("uri"), str):
                self._endpoint_url = urljoin(where, entry["uri"]).rstrip("/")
                self.log.info("Tape REST endpoint discovered: {endpoint}", endpoint=self._endpoint_url)
                return self._endpoint_url
        versions = ", ".join(str(e.get("version")) for e in offered) or "none"
        raise Refused(f"{where} offers no {API_VERSION} Tape REST endpoint (versions offered: {versions})")

    def _headers(self):
        headers = {b"Accept": [b"application/json"]}
        if self._token is not None:
            try:
                token = self._token.read().decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                raise Unreachable(f"cannot read the token file {self._token.path}: {error}") from None
            headers[b"Authorization"] = [b"Bearer " + token.encode("ascii", "replace")]
        return headers

    async def _call(self, method, url, body=None):
        """One HTTP exchange, answer body read, within request_timeout; raise Unreachable on failure."""
        exchange = self._track(defer.Deferred.fromCoroutine(self._exchange(method, url, body)))
        exchange.addTimeout(self.request_timeout, self.reactor)
        try:
            return await exchange
        except defer.TimeoutError:
            raise Unreachable(f"{method} {url} got no answer within {self.request_timeout:g}s") from None
        except defer.CancelledError:
            raise
        except (Unreachable, Refused):
            raise
        except Exception as error:
            raise Unreachable(f"{method} {url} failed: {describe(error)}") from None

    async def _exchange(self, method, url, body):
        kwargs = {"headers": self._headers()}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
            kwargs["headers"][b"Content-Type"] = [b"application/json"]
        response = await self.http.request(method, url, **kwargs)
        content = await response.content()
        if len(content) > MAX_BODY:
            raise Unreachable(f"{method} {url}: answer too large ({len(content)} bytes)")
        return Answer(response.code, response.headers, content)

    async def _sleep(self, seconds):
        await self._track(task.deferLater(self.clock, seconds, lambda: None))

    async def _best_effort(self, what, job, tail, body):
        try:
            endpoint = await self._endpoint()
            answer = await self._call("POST", endpoint + tail, body)
            if not 200 <= answer.code < 300:
                self.log.warn("job {job_id}: Tape REST {what} answered HTTP {code}: {why}", job_id=job.job_id,
                              what=what, code=answer.code, why=answer.problem())
        except defer.CancelledError:
            pass
        except Exception as error:
            self.log.warn("job {job_id}: Tape REST {what} failed: {error}", job_id=job.job_id, what=what,
                          error=error)

    def _track(self, deferred):
        """Remember work in flight, so that close() can cancel it."""
        self._busy.add(deferred)
        deferred.addBoth(self._untrack, deferred)
        return deferred

    def _untrack(self, result, deferred):
        self._busy.discard(deferred)
        return result


class _StagerService(MultiService):
    """The stager's poller; stopping it stops the stager taking new work (see TapeRestStager.services)."""

    def __init__(self, stager):
        super().__init__()
        self.stager = stager
        self.timer = TimerService(stager.poll_interval, stager.poll_once)
        self.timer.clock = stager.clock
        self.timer.setServiceParent(self)

    def startService(self):
        self.stager._start_intake()
        super().startService()

    def stopService(self):
        self.stager._stop_intake()
        return super().stopService()


def from_config(config, clock, store):
    """The Tape REST stager from [stager]: url and an absolute archive_root are required."""
    from transferd.config import ConfigError

    section = config.stager
    if not section.url:
        raise ConfigError("[stager] url must name the Tape REST endpoint or its site for backend = taperest")
    if not posixpath.isabs(section.archive_root):
        raise ConfigError(
            f"[stager] archive_root = {section.archive_root!r}: with backend = taperest it must be the absolute "
            "tape namespace directory that holds the products (e.g. /pnfs/example.org/data/meerkat)"
        )
    if section.key and not section.cert:
        raise ConfigError("[stager] key is set but cert is not")
    if section.token_file and not os.path.isfile(section.token_file):
        raise ConfigError(f"[stager] token_file {section.token_file!r} is not a file")
    tls_policy = None
    if section.cert or section.ca_path:
        try:
            tls_policy = client_tls_policy(section.ca_path, section.cert, section.key)
        except (OSError, ValueError, SSL.Error, crypto.Error) as error:
            raise ConfigError(f"[stager] cert/key/ca_path cannot be used: {error}") from None
    return TapeRestStager(
        section.url,
        section.archive_root,
        store,
        clock,
        bulk_size=section.bulk_size,
        poll_interval=section.poll_interval,
        timeout=section.timeout,
        max_attempts=section.max_attempts,
        retry_delay=section.retry_delay,
        token_file=section.token_file,
        tls_policy=tls_policy,
    )
