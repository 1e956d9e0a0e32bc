"""The callback stager: a stager service over HTTP that reports back through /doneStaging.

transferd asks the stager to stage a product, and the stager calls back
later (docs/architecture.md, "Stager callback protocol"):

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

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from transferd.http import HTTPClient, answer_message, describe
from transferd.interfaces import IStager
from transferd.jobs import StageResult
from transferd.tls import client_tls_policy

RETRYABLE_STATUS = frozenset({408, 429})  # 4xx answers that mean "try again later"


@implementer(IStager)
class CallbackStager(Service):
    """Asks a stager service over HTTP to stage products; it reports back through POST /doneStaging."""

    log = Logger()
    batch_size = 1

    def __init__(self, url, public_url, reactor, clock, timeout, max_attempts, retry_delay, tls_policy=None,
                 request_timeout=30.0, max_retry_delay=60.0, random=random.random):
        """url: where staging requests are POSTed (DELETE <url>/<job_id> on cancel and when a job ends).
        public_url: transferd's own URL as the stager reaches it; callbacks go to <public_url>/doneStaging.
        reactor, clock: do the network I/O, and time retries and requests.
        timeout, max_attempts: the IStager attributes (a staging attempt's limit, attempts per job);
        max_attempts also bounds the tries of each request to an unreachable stager.
        retry_delay: seconds before the first retry; it doubles each time (at most max_retry_delay),
        and the actual wait is drawn at random below it (full jitter), so that many jobs retrying
        together spread out.
        tls_policy: the IPolicyForHTTPS to use (default: the system's CAs).
        request_timeout: seconds a whole request (answer body included) may take.
        """
        self.url = url
        self.callback_url = public_url.rstrip("/") + "/doneStaging"
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.clock = clock
        self.random = random
        self.http = HTTPClient(reactor, clock, timeout=request_timeout, tls_policy=tls_policy,
                               headers={"Accept": "application/json"})
        self._work = set()  # stage() and DELETE coroutines in flight, cancelled when the service stops

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """The stager cannot tell at once whether a product exists: fire None."""
        return defer.succeed(None)

    def stage(self, job, authcode):
        """POST the staging request; fire None once accepted, or a failed StageResult.

        Cancelling the Deferred stops the request or the retry wait at once.
        """
        return self._track(defer.Deferred.fromCoroutine(self._stage(job, authcode)))

    def cancel(self, job):
        """Tell the stager to stop staging job (DELETE, in the background; failures are logged)."""
        self._forget(job, "cancelled")
        return defer.succeed(None)

    def free_copy(self, job):
        """The job has ended: tell the stager to free its staged copy (the same DELETE as cancel)."""
        self._forget(job, "ended")
        return defer.succeed(None)

    def pollers(self, outcomes):
        return []  # the stager reports through POST /doneStaging

    def stopService(self):
        """Cancel pending retries and requests (their stage() fails with CancelledError); close the pool."""
        super().stopService()
        for work in list(self._work):
            work.cancel()
        return self.http.stop()

    # -- internals --------------------------------------------------------

    async def _stage(self, job, authcode):
        body = {"job_id": job.job_id, "product_id": job.product_id,
                "callback_url": self.callback_url, "authcode": authcode}
        problem = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                await task.deferLater(self.clock, self._backoff(attempt - 1), lambda: None)
            try:
                answer = await self.http.request("POST", self.url, json=body)
            except defer.CancelledError:
                raise  # stage() was cancelled, or we are shutting down
            except Exception as error:
                problem = describe(error)
            else:
                if 200 <= answer.code < 300:
                    self.log.info("job {job_id}: the stager at {url} accepted the staging request "
                                  "(HTTP {code}); waiting for its callback",
                                  job_id=job.job_id, url=self.url, code=answer.code)
                    return None
                if answer.code < 500 and answer.code not in RETRYABLE_STATUS:
                    msg = (f"the stager at {self.url} refused the request: HTTP {answer.code}: "
                           f"{answer_message(answer.body)}")
                    self.log.warn("job {job_id}: {msg}", job_id=job.job_id, msg=msg)
                    return StageResult(success=False, msg=msg)
                problem = f"HTTP {answer.code}: {answer_message(answer.body)}"
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

    def _track(self, deferred):
        self._work.add(deferred)

        def done(result):
            self._work.discard(deferred)
            return result

        return deferred.addBoth(done)

    def _forget(self, job, why):
        """DELETE <url>/<job_id> in the background: best effort, one try, outcome logged."""
        target = self.url.rstrip("/") + "/" + quote(job.job_id, safe="")

        async def notify():
            try:
                answer = await self.http.request("DELETE", target)
            except defer.CancelledError:
                return
            except Exception as error:
                self.log.warn("job {job_id} ({why}): could not tell the stager at {url} to forget it: {error}",
                              job_id=job.job_id, why=why, url=target, error=describe(error))
                return
            if 200 <= answer.code < 300 or answer.code == 404:
                self.log.info("job {job_id} ({why}): the stager at {url} has forgotten it (HTTP {code})",
                              job_id=job.job_id, why=why, url=target, code=answer.code)
            else:
                self.log.warn("job {job_id} ({why}): the stager at {url} answered HTTP {code}: {msg}",
                              job_id=job.job_id, why=why, url=target, code=answer.code,
                              msg=answer_message(answer.body))

        self._track(defer.Deferred.fromCoroutine(notify()))


def from_config(config, reactor, clock, store):
    """The callback stager from [stager] url, timeout, max_attempts, retry_delay (and TLS keys) and [api] public_url."""
    from transferd.config import ConfigError

    section = config.stager  # transferd.config has checked that url is set
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
        reactor=reactor,
        clock=clock,
        tls_policy=tls_policy,
    )
