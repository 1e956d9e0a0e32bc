"""transferd-stager: a reference stager speaking transferd's callback protocol.

    twistd -n transferd-stager --archive DIR --staging DIR [--endpoint tcp:8081:interface=127.0.0.1]

It is small on purpose: read it when you write a stager of your own (in any
language) for `[stager] backend = callback`.  Here "tape" is a directory
(--archive) holding one file or directory per product id, and staging
copies (or hard-links, --link) a product to --staging/<job_id>/<product_id>.

The protocol, both ways
-----------------------

1. transferd asks for a product:

       POST /stage   Content-Type: application/json
       {"job_id": "<uuid>", "product_id": "<plain name>",
        "callback_url": "https://transferd.example.org/doneStaging", "authcode": "<opaque>"}

   Answer 2xx at once, before staging (this stager: 202 {"job_id", "accepted": true}).
   A 5xx (or 408/429, with Retry-After if you know when you will be back),
   or no answer, means you are away: the job waits and transferd asks again
   later, with a new authcode (below), until you have been away for its
   [stager] give_up_after.  Should the same request arrive twice anyway,
   recognise it by job_id and authcode, and do not stage twice.  A 4xx
   other than 408/429 fails the job at once with your "msg" (answer JSON
   {"error": true, "msg"}).

   The same job_id with a NEW authcode means transferd gave up waiting for
   you (its [stager] timeout), or could not tell whether you took the last
   request, and asks again: drop the old attempt and start over.  Only the
   newest authcode is accepted by transferd.

2. When the product is on disk (or cannot be), call back:

       POST <callback_url>   Content-Type: application/json
       {"job_id", "product_id", "authcode",        <- as received
        "success": true,
        "staged_to": "<this host>", "path": "<absolute path of the staged product>",
        "msg": "<words for the user>",
        "files": [{"path": "<product>/sub/file", "size": 123, "checksum": "adler32:0a1b2c3d"}, ...]}

   File paths are relative to the directory holding the staged product, so
   they start with the product name.  On failure send "success": false and
   say why in "msg"; it becomes the job's detailed_status.

   transferd answers 200 when it recorded the report (or when the same
   successful report is repeated), 400 for a malformed report, 403 when the
   authcode is wrong, used or expired or the job was cancelled, 404 for an
   unknown job.  Retry while it cannot be reached or answers 5xx (it may be
   restarting); stop on 2xx, and give up on other 4xx.

3. transferd tells you to forget a job (cancelled, or ended and delivered):

       DELETE /stage/<job_id>    -> 200, or 404 for a job you do not know

   Stop any work on it, call back no more, and free its staged copy.

4. (optional) transferd asks whether you still work on a job's attempt:

       GET /stage/<job_id>       -> 200 {"job_id", "product_id", "state",
                                         "authcode_sha256"}, or 404

   "state" is accepted, recalling, copying or calling back while the report
   is still to come (then done, refused, given up or dropped), and
   "authcode_sha256" the hex SHA-256 of the attempt's authcode.  transferd
   asks before staging again a job whose worker died after you accepted it:
   while you still work on the attempt it holds, it waits for your report
   rather than asking twice.  A stager without it answers 404 or 405, and
   such a job is staged again.  Operators read the same answer.

Options inject delays and failures for tests: --delay,
--fail-products, --drop-first, --unavailable-first, --answer-after,
--ignore-cancel.
"""

import configparser
import dataclasses
import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading
from typing import Optional
from urllib.parse import urlsplit

from klein import Klein
from twisted.application import service, strports
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python import usage
from werkzeug.exceptions import MethodNotAllowed, NotFound

from transferd import files, jobs, validation
from transferd.http import HTTPClient, answer_message, describe
from transferd.tls import client_tls_policy
from transferd.web import LimitedSite

MAX_BODY_BYTES = 65536
RETRYABLE_STATUS = frozenset({408, 429})  # 4xx answers that mean "try again later"


# -- staging a product on disk (runs in a thread) ---------------------------------


class Stopped(Exception):
    """The job was cancelled (DELETE), superseded or the stager is stopping: the copy was abandoned."""


def stage_product(archive, staging_root, job_id, product_id, link, stop):
    """Place archive/product_id at staging_root/job_id/product_id; runs in a thread.

    Returns (absolute path, sorted file list), or None when the product is not
    in the archive.  The copy is made under a temporary name and renamed into
    place, so a crash never leaves a half copy that looks complete.  stop is
    a threading.Event: once set, the copy ends at its next chunk (Stopped).
    """
    source = os.path.join(archive, product_id)
    if not os.path.exists(source):
        return None

    def check():
        if stop.is_set():
            raise Stopped()

    job_dir = os.path.join(staging_root, job_id)
    staged = files.stage_copy(source, job_dir, product_id, check=check, link=link)
    return os.path.abspath(os.path.join(job_dir, product_id)), [f.to_dict() for f in staged]


# -- talking HTTP ---------------------------------------------------------------------


class HTTPError(Exception):
    """Answer code with {"error": true, "msg": msg} (raised by handlers, turned into JSON by bad_request)."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _json(request, code, body):
    request.setResponseCode(code)
    request.setHeader("Content-Type", "application/json; charset=utf-8")
    return (json.dumps(body) + "\n").encode("utf-8")


def _after(deferred):
    """A new Deferred firing with None once deferred has fired (deferred's own result is untouched)."""
    waiter = defer.Deferred()

    def fire(result):
        waiter.callback(None)
        return result

    deferred.addBoth(fire)
    return waiter


def parse_order(body):
    """Check a POST /stage body; return (job_id, product_id, callback_url, authcode) or raise HTTPError 400."""
    try:
        order = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "the body must be a JSON object") from None
    if not isinstance(order, dict):
        raise HTTPError(400, "the body must be a JSON object")
    job_id, product_id = order.get("job_id"), order.get("product_id")
    callback_url, authcode = order.get("callback_url"), order.get("authcode")
    if not isinstance(job_id, str) or not jobs.is_job_id(job_id):
        raise HTTPError(400, "job_id must be a job id (a UUID in canonical form)")
    try:
        validation.product_id(product_id)  # a plain name: it becomes a path under --archive
    except validation.BadRequest as error:
        raise HTTPError(400, str(error)) from None
    try:
        url = urlsplit(callback_url) if isinstance(callback_url, str) else None
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.hostname or len(callback_url) > 2048:
        raise HTTPError(400, "callback_url must be an http:// or https:// URL")
    if not isinstance(authcode, str) or not authcode or len(authcode) > 256:
        raise HTTPError(400, "authcode is required (text of at most 256 characters)")
    return job_id, product_id, callback_url, authcode


# -- the stager -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Staging:
    """One staging request this stager has accepted, from acceptance to the end of its callback."""

    job_id: str
    product_id: str
    callback_url: str
    authcode: str
    state: str = "accepted"  # then: recalling, copying, calling back, done, refused, given up, dropped
    stopped: bool = False  # DELETE, a newer request for the job, or shutdown
    stop_copy: threading.Event = dataclasses.field(default_factory=threading.Event)
    waiting: Optional[defer.Deferred] = None  # the timer or callback the work waits on; cancelled to stop
    work: Optional[defer.Deferred] = None  # the whole job's work; it never fails


class ReferenceStager:
    """The HTTP API (a Klein app) and the staging work behind it.

    archive, staging: the directories products come from and go to.
    hostname: reported as staged_to.  delay: seconds of simulated recall.
    link: hard-link instead of copying.  fail_products, drop_first,
    unavailable_first, answer_after, ignore_cancel: injected faults for tests (see Options).
    callback_retry, callback_retry_max, callback_deadline: how callbacks are
    retried.  reactor, clock: do the callbacks' I/O, and time delays and
    retries (a Clock in tests).  tls_policy: for callbacks (default: the
    system's CAs).  random: the jitter source, returning a float in [0, 1).
    """

    app = Klein()
    log = Logger()

    def __init__(self, archive, staging, reactor, clock, hostname=None, delay=0.0, link=False, fail_products=(),
                 drop_first=0, unavailable_first=0, answer_after=0.0, ignore_cancel=False, callback_retry=1.0,
                 callback_retry_max=30.0, callback_deadline=86400.0, request_timeout=30.0,
                 tls_policy=None, random=random.random):
        self.archive = os.path.abspath(archive)
        self.staging = os.path.abspath(staging)
        self.hostname = hostname or socket.getfqdn()
        self.delay = delay
        self.link = link
        self.fail_products = frozenset(fail_products)
        self.drop_first = drop_first
        self.unavailable_first = unavailable_first
        self.answer_after = answer_after
        self.ignore_cancel = ignore_cancel
        self.callback_retry = callback_retry
        self.callback_retry_max = callback_retry_max
        self.callback_deadline = callback_deadline
        self.clock = clock
        self.random = random
        self.reactor, self.request_timeout = reactor, request_timeout
        self.http = HTTPClient(reactor, clock, timeout=request_timeout, tls_policy=tls_policy)
        self._retired_http = []  # clients replaced by a reload, closed with this one
        self.stagings = {}  # job_id -> the Staging now current for that job
        self.stage_requests = 0  # POST /stage requests seen (for --unavailable-first)
        self.accepted = 0  # stagings started (for --drop-first)
        self._works = set()  # every job's work still running, current or superseded
        self._closing = False

    def resource(self):
        return self.app.resource()

    def reconfigure(self, options):
        """Take the reloadable options (RELOADABLE) of a freshly parsed Options, all at once (SIGHUP).

        Stagings under way keep the archive copy they started; callbacks from now on use the new TLS settings.
        """
        self.archive = os.path.abspath(options["archive"])
        self.hostname = options["hostname"] or socket.getfqdn()
        self.delay, self.link = options["delay"], bool(options["link"])
        self.fail_products = frozenset(options["fail-products"])
        self.callback_retry, self.callback_retry_max = options["callback-retry"], options["callback-retry-max"]
        self.callback_deadline = options["callback-deadline"]
        if options.get("tls-changed"):
            self._retired_http.append(self.http)
            self.http = HTTPClient(self.reactor, self.clock, timeout=self.request_timeout,
                                   tls_policy=options["tls-policy"])

    # -- POST /stage ------------------------------------------------------

    @app.route("/stage", methods=["POST"])
    def stage(self, request):
        self.stage_requests += 1
        if self.stage_requests <= self.unavailable_first or self._closing:
            # transferd asks again later (with a new authcode) when we answer 503.
            return _json(request, 503, {"error": True, "msg": "the stager is not taking requests now; try again"})
        body = request.content.read()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        job_id, product_id, callback_url, authcode = parse_order(body)
        current = self.stagings.get(job_id)
        if current is not None and current.authcode == authcode:
            # transferd sent the same request again (it did not see our answer): one staging is enough.
            return _json(request, 202, {"job_id": job_id, "accepted": True})
        if current is not None:
            # A new authcode: transferd gave up on the earlier attempt; only the new one counts now.
            self.log.info("job {job_id}: asked again with a new authcode; restarting its staging", job_id=job_id)
            self._stop(current)
        staging = self.stagings[job_id] = Staging(job_id, product_id, callback_url, authcode)
        self.accepted += 1
        if self.accepted <= self.drop_first:
            staging.state = "dropped"
            self.log.info("job {job_id}: accepted {product_id} but dropped on purpose (--drop-first): "
                          "no callback will come", job_id=job_id, product_id=product_id)
        else:
            self.log.info("job {job_id}: accepted staging of {product_id}; will call back {url}",
                          job_id=job_id, product_id=product_id, url=callback_url)
            staging.work = defer.Deferred.fromCoroutine(self._work(staging, current))
            self._works.add(staging.work)
            staging.work.addBoth(lambda _, work=staging.work: self._works.discard(work))
        if self.answer_after:
            # Accepted and working, but transferd hears so only later (a crash of it meanwhile, in tests).
            return task.deferLater(self.clock, self.answer_after,
                                   lambda: _json(request, 202, {"job_id": job_id, "accepted": True}))
        return _json(request, 202, {"job_id": job_id, "accepted": True})

    # -- GET and DELETE /stage/<job_id> ----------------------------------------

    @app.route("/stage/<job_id>", methods=["GET"])
    def status(self, request, job_id):
        staging = self.stagings.get(job_id)
        if staging is None:
            raise HTTPError(404, f"no job {job_id} here")
        # The authcode's hash says which attempt this is (transferd stores only the hash).
        digest = hashlib.sha256(staging.authcode.encode("utf-8")).hexdigest()
        return _json(request, 200, {"job_id": job_id, "product_id": staging.product_id, "state": staging.state,
                                    "authcode_sha256": digest})

    @app.route("/stage/<job_id>", methods=["DELETE"])
    async def forget(self, request, job_id):
        if not jobs.is_job_id(job_id):
            raise HTTPError(400, "job_id must be a job id (a UUID in canonical form)")
        staging = self.stagings.get(job_id)
        job_dir = os.path.join(self.staging, job_id)
        if staging is not None and self.ignore_cancel:
            # Like a tape system that cannot abort a recall: transferd refuses the callback that follows.
            self.log.info("job {job_id}: DELETE ignored on purpose (--ignore-cancel); staging goes on",
                          job_id=job_id)
            return _json(request, 200, {"job_id": job_id, "forgotten": False})
        if staging is None and not await threads.deferToThread(os.path.lexists, job_dir):
            raise HTTPError(404, f"no job {job_id} here")
        if staging is not None:
            del self.stagings[job_id]
            await self._stop(staging)
        await threads.deferToThread(files.remove, job_dir)
        self.log.info("job {job_id}: DELETE: work stopped, staged copy removed", job_id=job_id)
        return _json(request, 200, {"job_id": job_id, "forgotten": True})

    # -- errors -----------------------------------------------------------

    @app.handle_errors(HTTPError)
    def bad_request(self, request, failure):
        return _json(request, failure.value.code, {"error": True, "msg": failure.value.msg})

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        return _json(request, 404, {"error": True,
                                    "msg": "no such endpoint: POST /stage, GET or DELETE /stage/<job_id>"})

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        return _json(request, 405, {"error": True, "msg": "method not allowed"})

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        self.log.failure("internal error answering {uri}", failure, uri=request.uri)
        return _json(request, 500, {"error": True, "msg": "internal error (see the stager's log)"})

    # -- the work of one job ------------------------------------------------------

    async def _work(self, staging, previous):
        """Recall, copy, call back: one job's work from acceptance to the end of its callback.

        It never fails: everything is logged here, since nobody waits on it but DELETE.
        """
        try:
            if previous is not None and previous.work is not None:
                # One job's attempts never overlap: the earlier one (stopped already) may still be
                # copying into the same directory.  Not cancellable, so work ends only after its
                # predecessors have.
                await _after(previous.work)
            staging.state = "recalling"
            await self._wait(staging, task.deferLater(self.clock, self.delay, lambda: None))
            report = await self._stage(staging)
            if staging.stopped:
                return
            if not await self._call_back(staging, report):
                # transferd will never fetch this copy (it refused it, or we gave up): free the space.
                await threads.deferToThread(files.remove, os.path.join(self.staging, staging.job_id))
        except (defer.CancelledError, Stopped):
            self.log.info("job {job_id}: staging stopped", job_id=staging.job_id)
        except Exception:
            self.log.failure("job {job_id}: staging failed unexpectedly", job_id=staging.job_id)

    async def _wait(self, staging, deferred):
        """Wait for deferred; stopping the staging cancels the wait (CancelledError)."""
        if staging.stopped:
            deferred.cancel()
        staging.waiting = deferred
        try:
            return await deferred
        finally:
            staging.waiting = None

    def _stop(self, staging):
        """Stop a staging: no more waiting, copying or calling back; fires when its work has ended."""
        staging.stopped = True
        staging.stop_copy.set()  # the copy thread checks this between chunks
        if staging.waiting is not None:
            staging.waiting.cancel()
        return _after(staging.work) if staging.work is not None else defer.succeed(None)

    async def _stage(self, staging):
        """Put the product on disk; return the callback's report (success or failure)."""
        report = {"job_id": staging.job_id, "product_id": staging.product_id, "authcode": staging.authcode}
        product_id = staging.product_id
        if product_id in self.fail_products:
            return {**report, "success": False,
                    "msg": f"staging of {product_id} failed: this stager was told to fail it (--fail-products)"}
        staging.state = "copying"
        try:
            placed = await threads.deferToThread(
                stage_product, self.archive, self.staging, staging.job_id, product_id, self.link, staging.stop_copy)
        except Stopped:
            raise
        except OSError as error:
            self.log.failure("job {job_id}: staging {product_id} failed", job_id=staging.job_id, product_id=product_id)
            return {**report, "success": False, "msg": f"staging of {product_id} failed: {error}"}
        if placed is None:
            return {**report, "success": False, "msg": f"product {product_id!r} is not in the archive"}
        path, files = placed
        total = sum(f["size"] for f in files)
        self.log.info("job {job_id}: staged {product_id} to {path}: {count} file(s), {total} bytes",
                      job_id=staging.job_id, product_id=product_id, path=path, count=len(files), total=total)
        return {**report, "success": True, "staged_to": self.hostname, "path": path,
                "msg": f"staged {len(files)} file(s), {total} bytes", "files": files}

    async def _call_back(self, staging, report):
        """POST the report to transferd until it answers; True once it has recorded it.

        transferd may be down or restarting: connection errors and 5xx are
        retried with exponential backoff (full jitter, at most
        callback_retry_max seconds apart) until callback_deadline.  Any other
        4xx means transferd will never take this report (cancelled job,
        expired or replaced authcode): give up.
        """
        staging.state = "calling back"
        deadline = self.clock.seconds() + self.callback_deadline
        ceiling = self.callback_retry
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._wait(staging, self.http.request("POST", staging.callback_url, json=report))
            except defer.CancelledError:
                raise
            except Exception as error:
                problem = describe(error)
            else:
                code = answer.code
                if 200 <= code < 300:
                    staging.state = "done"
                    self.log.info("job {job_id}: transferd recorded the staging report (HTTP {code})",
                                  job_id=staging.job_id, code=code)
                    return True
                if code < 500 and code not in RETRYABLE_STATUS:
                    staging.state = "refused"
                    self.log.warn("job {job_id}: transferd refused the staging report (HTTP {code}: {msg}); "
                                  "giving up", job_id=staging.job_id, code=code, msg=answer_message(answer.body))
                    return False
                problem = f"HTTP {code}: {answer_message(answer.body)}"
            wait = ceiling * self.random()
            if self.clock.seconds() + wait > deadline:
                staging.state = "given up"
                self.log.warn("job {job_id}: callback failed {attempts} time(s), last: {problem}; "
                              "giving up (--callback-deadline)", job_id=staging.job_id, attempts=attempt,
                              problem=problem)
                return False
            self.log.info("job {job_id}: callback attempt {attempt} failed ({problem}); trying again in {wait:.1f}s",
                          job_id=staging.job_id, attempt=attempt, problem=problem, wait=wait)
            await self._wait(staging, task.deferLater(self.clock, wait, lambda: None))
            ceiling = min(ceiling * 2, self.callback_retry_max)

    # -- shutting down -------------------------------------------------------------

    async def close(self):
        """Stop every staging (the copies end at their next chunk), then close the HTTP pool."""
        self._closing = True
        for staging in self.stagings.values():
            self._stop(staging)
        await defer.gatherResults([_after(work) for work in list(self._works)])
        for http in [*self._retired_http, self.http]:
            await http.stop()


# -- twistd ----------------------------------------------------------------------------


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value >= 0:  # not a number, negative or NaN
        raise ValueError("must be a number of seconds, zero or more")
    return value


def _count(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 0:
        raise ValueError("must be a whole number, zero or more")
    return value


# The options SIGHUP applies (from --config FILE, read again); a change to another one is logged as needing a restart.
RELOADABLE = frozenset({"archive", "hostname", "delay", "link", "fail-products", "callback-retry",
                        "callback-retry-max", "callback-deadline", "callback-ca", "callback-cert", "callback-key"})
CONFIG_SECTION = "transferd-stager"


class Options(usage.Options):
    synopsis = "--archive DIR --staging DIR [--endpoint SPEC] [--config FILE] [options]"
    longdesc = ("A reference stager for transferd's callback protocol ([stager] backend = callback, "
                "url = http://HOST:PORT/stage). Products are files or directories under --archive; "
                "staging copies them to --staging/<job_id>/<product_id> and calls transferd back.")
    optParameters = [
        ["config", "c", None, "INI file whose [transferd-stager] section holds options (key = the option's long"
                              " name); the command line wins over it; SIGHUP reads it again"],
        ["archive", None, None, "directory holding the products, one file or directory per product id"],
        ["staging", None, None, "directory receiving staged copies (created if missing)"],
        ["endpoint", "e", "tcp:8081:interface=127.0.0.1", "listen on this Twisted endpoint"],
        ["hostname", None, None, "host name reported as staged_to (default: this host's FQDN)"],
        ["callback-ca", None, None, "CA certificates (PEM file or hashed directory) to verify an https "
                                    "callback_url (default: the system's CAs)"],
        ["callback-cert", None, None, "certificate (or proxy) to present when calling back, for a transferd "
                                      "that requires client certificates ([auth] stager_dns)"],
        ["callback-key", None, None, "the key of --callback-cert, when not in the same file"],
        ["delay", None, "0", "seconds to wait before staging, like a tape recall"],
        ["callback-retry", None, "1", "seconds before the first retry of a failed callback (doubles)"],
        ["callback-retry-max", None, "30", "at most this many seconds between callback retries"],
        ["callback-deadline", None, "86400", "give up calling back this many seconds after the first try"],
        ["fail-products", None, "", "testing: report failure for these product ids (comma-separated)"],
        ["drop-first", None, "0", "testing: accept the first N staging requests but never call back"],
        ["unavailable-first", None, "0", "testing: answer 503 to the first N POST /stage"],
        ["answer-after", None, "0", "testing: answer each POST /stage this many seconds after accepting it "
                                    "(the staging starts at once)"],
    ]
    optFlags = [
        ["link", None, "hard-link the archive's files instead of copying them (same filesystem)"],
        ["ignore-cancel", None, "testing: answer DELETE but go on staging and calling back"],
    ]

    def parseOptions(self, options=None):
        """The options of --config FILE come first, so that the command line's own win."""
        self.arguments = list(sys.argv[1:] if options is None else options)  # SIGHUP parses them again
        super().parseOptions(self._file_arguments(self.arguments) + self.arguments)

    def _file_arguments(self, arguments):
        path = None
        for at, argument in enumerate(arguments):
            if argument in ("--config", "-c") and at + 1 < len(arguments):
                path = arguments[at + 1]
            elif argument.startswith("--config="):
                path = argument.split("=", 1)[1]
        if path is None:
            return []
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as error:
            raise usage.UsageError(f"--config {path}: {error.strerror}") from None
        except (configparser.Error, UnicodeDecodeError) as error:
            raise usage.UsageError(f"--config {path} is not a valid INI file: {' '.join(str(error).split())}") from None
        known = {name for name, *_ in self.optParameters} | {name for name, *_ in self.optFlags}
        extra = [section for section in parser.sections() if section != CONFIG_SECTION]
        if extra:
            raise usage.UsageError(f"--config {path}: unknown section [{extra[0]}] (options go in [{CONFIG_SECTION}])")
        found = []
        for key, value in parser.items(CONFIG_SECTION) if parser.has_section(CONFIG_SECTION) else ():
            if key not in known or key == "config":
                raise usage.UsageError(f"--config {path}: unknown option {key} in [{CONFIG_SECTION}]")
            if key in {name for name, *_ in self.optFlags}:
                if value.strip().lower() not in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                    raise usage.UsageError(f"--config {path}: {key} must be true or false")
                found += [f"--{key}"] if value.strip().lower() in ("true", "yes", "on", "1") else []
            else:
                found.append(f"--{key}={value.strip()}")
        return found

    def postOptions(self):
        for name in ("archive", "staging"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        if not os.path.isdir(self["archive"]):
            raise usage.UsageError(f"--archive {self['archive']} is not a directory")
        for name, parse in (("delay", _seconds), ("answer-after", _seconds), ("callback-retry", _seconds),
                            ("callback-retry-max", _seconds), ("callback-deadline", _seconds),
                            ("drop-first", _count), ("unavailable-first", _count)):
            try:
                self[name] = parse(self[name])
            except ValueError as error:
                raise usage.UsageError(f"--{name} {self[name]!r}: {error}") from None
        if self["callback-retry"] <= 0:
            raise usage.UsageError("--callback-retry must be greater than zero")
        self["fail-products"] = tuple(p.strip() for p in self["fail-products"].split(",") if p.strip())
        self["tls-policy"] = None
        if self["callback-key"] and not self["callback-cert"]:
            raise usage.UsageError("--callback-key needs --callback-cert")
        if self["callback-ca"] or self["callback-cert"]:
            try:
                self["tls-policy"] = client_tls_policy(self["callback-ca"], self["callback-cert"], self["callback-key"])
            except (OSError, ValueError) as error:
                raise usage.UsageError(f"--callback-ca / --callback-cert: {error}") from None


class StagerService(service.MultiService):
    """The listener and the stager; stopping closes the listener first, then stops all work."""

    log = Logger()

    def __init__(self, stager, endpoint, reactor, options=None):
        super().__init__()
        self.options = options  # the parsed Options, which SIGHUP parses again
        self.stager = stager
        self.reactor = reactor
        site = LimitedSite(stager.resource(), MAX_BODY_BYTES)
        strports.service(endpoint, site, reactor=reactor).setServiceParent(self)

    def startService(self):
        super().startService()
        signal.signal(signal.SIGHUP, self._sighup)
        self.log.info("transferd-stager started: archive {archive}, staging {staging}",
                      archive=self.stager.archive, staging=self.stager.staging)

    def _sighup(self, signum, frame):
        """SIGHUP reads --config again (it would kill the daemon by default)."""
        self.reactor.callFromThread(self.reload)

    def reload(self):
        """Parse the command line and --config again; apply the RELOADABLE options, name the others that changed.

        Options that do not parse or fail their checks change nothing: one line says why.
        """
        if self.options is None or self.options.get("config") is None:
            self.log.info("SIGHUP: no --config file to read again")
            return False
        fresh = Options()
        try:
            fresh.parseOptions(self.options.arguments)
        except (usage.UsageError, SystemExit) as error:
            self.log.error("options not reloaded, nothing changed: {error}", error=error)
            return False
        names = [name for name, *_ in Options.optParameters + Options.optFlags]
        changed = [name for name in names if fresh[name] != self.options[name]]
        for name in changed:
            if name not in RELOADABLE:
                self.log.warn("--{name} changed: restart transferd-stager to apply it", name=name)
        applied = [name for name in changed if name in RELOADABLE]
        fresh["tls-changed"] = bool({"callback-ca", "callback-cert", "callback-key"} & set(applied))
        if applied:
            self.stager.reconfigure(fresh)
            for name in applied:
                self.options[name] = fresh[name]
            self.options["tls-policy"] = fresh["tls-policy"]
        self.log.info("options reloaded: {changed}", changed=", ".join(f"--{name}" for name in applied) or "none changed")
        return True

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        yield defer.Deferred.fromCoroutine(self.stager.close())


def makeService(options):
    from twisted.internet import reactor

    os.makedirs(options["staging"], exist_ok=True)
    stager = ReferenceStager(
        archive=options["archive"],
        staging=options["staging"],
        reactor=reactor,
        clock=reactor,
        hostname=options["hostname"],
        delay=options["delay"],
        link=bool(options["link"]),
        fail_products=options["fail-products"],
        drop_first=options["drop-first"],
        unavailable_first=options["unavailable-first"],
        answer_after=options["answer-after"],
        ignore_cancel=bool(options["ignore-cancel"]),
        callback_retry=options["callback-retry"],
        callback_retry_max=options["callback-retry-max"],
        callback_deadline=options["callback-deadline"],
        tls_policy=options["tls-policy"],
    )
    return StagerService(stager, options["endpoint"], reactor, options)
