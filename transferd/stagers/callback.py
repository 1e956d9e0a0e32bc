"""The callback stager: a stager service over HTTP that reports back through /doneStaging.

transferd asks the stager to stage a product, and the stager calls back
later (DESIGN.md, "Stager callback protocol"):

    transferd -> stager    POST <url>  {"job_id", "product_id", "callback_url", "authcode"}
                           2xx: accepted; the stager will POST callback_url when done
    stager -> transferd    POST <public_url>/doneStaging  {job_id, product_id, authcode,
                           success, staged_to, path, msg, files}
    transferd -> stager    DELETE <url>/<job_id>  the job was cancelled or has ended:
                           stop working on it and free its staged copy

stage() fires None once the stager has accepted the request; the pipeline
then holds the job for `timeout` seconds and stages it again, with a new
authcode, if no callback came.  A stager that cannot be reached (or answers
5xx, 408 or 429) is asked again with exponential backoff and full jitter, up
to max_attempts tries in all; then the job fails with the reason.  Any other
refusal (4xx) fails the job at once with the stager's own message.
transferd-stager (transferd.stagerd) is a reference stager speaking this
protocol.
"""

import random
from urllib.parse import quote

import treq
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from transferd.http import answer_message, describe
from transferd.interfaces import IStager
from transferd.jobs import StageResult
from transferd.tls import client_tls_policy

RETRYABLE_STATUS = frozenset({408, 429})  # 4xx answers that mean "try again later"


class StagerTimeout(Exception):
    """The stager gave no complete answer in time."""


# -- the stager -------------------------------------------------------------------


@implementer(IStager)
class CallbackStager:
    """Asks a stager service over HTTP to stage products; it reports back through POST /doneStaging."""

    log = Logger()

    def __init__(self, url, public_url, timeout, max_attempts, retry_delay, clock, pool=None, tls_policy=None,
                 request_timeout=30.0, max_retry_delay=60.0, random=random.random):
        """url: where staging requests are POSTed (DELETE <url>/<job_id> on cancel and when a job ends).
        public_url: transferd's own URL as the stager reaches it; callbacks go to <public_url>/doneStaging.
        timeout, max_attempts: the IStager attributes (a staging attempt's limit, attempts per job);
        max_attempts also bounds the tries of each request to an unreachable stager.
        retry_delay: seconds before the first retry; it doubles each time (at most max_retry_delay),
        and the actual wait is drawn at random below it (full jitter), so that many jobs retrying
        together spread out.
        clock: times retries and request timeouts (the reactor, or a Clock in tests).
        pool, tls_policy: the HTTPConnectionPool and IPolicyForHTTPS to use (default: our own pool,
        the system's CAs).
        request_timeout: seconds a whole request (answer body included) may take.
        """
        from twisted.internet import reactor

        self.url = url
        self.callback_url = public_url.rstrip("/") + "/doneStaging"
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.request_timeout = request_timeout
        self.clock = clock
        self.random = random
        self.pool = pool if pool is not None else HTTPConnectionPool(reactor, persistent=True)
        agent = Agent(reactor, pool=self.pool) if tls_policy is None else \
            Agent(reactor, contextFactory=tls_policy, pool=self.pool)
        self.http = treq.client.HTTPClient(agent)
        self._pending = set()  # retry timers and requests in flight, cancelled by close()
        self._closed = False

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """The stager cannot tell at once whether a product exists: fire None."""
        return defer.succeed(None)

    def stage(self, job, authcode):
        """POST the staging request; fire None once accepted, or a failed StageResult."""
        return defer.Deferred.fromCoroutine(self._stage(job, authcode))

    def cancel(self, job):
        """Tell the stager to stop staging job (DELETE, in the background; failures are logged)."""
        self._forget(job, "cancelled")
        return defer.succeed(None)

    def release(self, job):
        """The job has ended: tell the stager to free its staged copy (the same DELETE as cancel)."""
        self._forget(job, "ended")
        return defer.succeed(None)

    def close(self):
        """Cancel pending retries and requests (their stage() fails with CancelledError); close the pool."""
        self._closed = True
        for pending in list(self._pending):
            pending.cancel()
        return self.pool.closeCachedConnections()

    # -- internals --------------------------------------------------------

    async def _stage(self, job, authcode):
        body = {"job_id": job.job_id, "product_id": job.product_id,
                "callback_url": self.callback_url, "authcode": authcode}
        problem = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                await self._sleep(self._backoff(attempt - 1))
            try:
                code, answer = await self._request("POST", self.url, json=body)
            except defer.CancelledError:
                raise  # close(): we are shutting down
            except Exception as error:
                if self._closed:  # the request was cut short by close(), not by the stager
                    raise defer.CancelledError() from error
                problem = describe(error)
            else:
                if 200 <= code < 300:
                    self.log.info("job {job_id}: the stager at {url} accepted the staging request "
                                  "(HTTP {code}); waiting for its callback",
                                  job_id=job.job_id, url=self.url, code=code)
                    return None
                if code < 500 and code not in RETRYABLE_STATUS:
                    msg = f"the stager at {self.url} refused the request: HTTP {code}: {answer_message(answer)}"
                    self.log.warn("job {job_id}: {msg}", job_id=job.job_id, msg=msg)
                    return StageResult(success=False, msg=msg)
                problem = f"HTTP {code}: {answer_message(answer)}"
            if attempt < self.max_attempts:
                self.log.warn("job {job_id}: the stager at {url} could not take the request ({problem}); "
                              "attempt {attempt} of {attempts}, trying again",
                              job_id=job.job_id, url=self.url, problem=problem,
                              attempt=attempt, attempts=self.max_attempts)
        msg = f"the stager at {self.url} could not be reached after {self.max_attempts} attempts: {problem}"
        self.log.warn("job {job_id}: {msg}", job_id=job.job_id, msg=msg)
        return StageResult(success=False, msg=msg)

    def _backoff(self, retry):
        """Seconds to wait before retry number `retry` (1, 2, ...): full jitter under a doubling ceiling."""
        ceiling = min(self.max_retry_delay, self.retry_delay * 2 ** (retry - 1))
        return ceiling * self.random()

    def _sleep(self, seconds):
        return self._track(task.deferLater(self.clock, seconds, lambda: None))

    def _request(self, method, url, **kwargs):
        """One whole request, answer body read, within request_timeout; fires (code, body bytes)."""

        async def whole():
            response = await self.http.request(method, url, allow_redirects=False,
                                               headers={"Accept": "application/json"}, **kwargs)
            return response.code, await response.content()  # always read the body: it frees the connection

        def timed_out(result, timeout):
            raise StagerTimeout(f"no complete answer within {timeout:g}s")

        request = defer.Deferred.fromCoroutine(whole())
        request.addTimeout(self.request_timeout, self.clock, onTimeoutCancel=timed_out)
        return self._track(request)

    def _track(self, deferred):
        if self._closed:
            deferred.cancel()
            return deferred
        self._pending.add(deferred)

        def done(result):
            self._pending.discard(deferred)
            return result

        return deferred.addBoth(done)

    def _forget(self, job, why):
        """DELETE <url>/<job_id> in the background: best effort, one try, outcome logged."""
        target = self.url.rstrip("/") + "/" + quote(job.job_id, safe="")

        async def notify():
            try:
                code, answer = await self._request("DELETE", target)
            except defer.CancelledError:
                return
            except Exception as error:
                self.log.warn("job {job_id} ({why}): could not tell the stager at {url} to forget it: {error}",
                              job_id=job.job_id, why=why, url=target, error=describe(error))
                return
            if 200 <= code < 300 or code == 404:
                self.log.info("job {job_id} ({why}): the stager at {url} has forgotten it (HTTP {code})",
                              job_id=job.job_id, why=why, url=target, code=code)
            else:
                self.log.warn("job {job_id} ({why}): the stager at {url} answered HTTP {code}: {msg}",
                              job_id=job.job_id, why=why, url=target, code=code, msg=answer_message(answer))

        defer.Deferred.fromCoroutine(notify())


def from_config(config, clock, store):
    """The callback stager from [stager] url, timeout, max_attempts, retry_delay (and TLS keys) and [api] public_url."""
    from transferd.config import ConfigError

    section = config.stager
    if not section.url:
        raise ConfigError("[stager] url is required with backend = callback (e.g. http://stager:8081/stage)")
    tls_policy = None
    if section.url.startswith("https:"):
        try:
            tls_policy = client_tls_policy(section.ca_path, section.cert, section.key)
        except (OSError, ValueError) as error:
            raise ConfigError(f"[stager] ca_path/cert/key cannot be used: {error}") from None
    return CallbackStager(
        url=section.url,
        public_url=config.api.public_url,
        timeout=section.timeout,
        max_attempts=section.max_attempts,
        retry_delay=section.retry_delay,
        clock=clock,
        tls_policy=tls_policy,
    )
