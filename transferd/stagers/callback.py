"""The callback stager: a stager service over HTTP that reports back through /doneStaging.

transferd asks the stager to stage a product, and the stager calls back
later (docs/architecture.md, "Stager callback protocol"):

    transferd -> stager    POST <url>  {"job_id", "product_id", "callback_url", "authcode"}
                           2xx: accepted; the stager will POST callback_url when done
    stager -> transferd    POST <public_url>/doneStaging  {job_id, product_id, authcode,
                           success, staged_to, path, msg, files}
    transferd -> stager    DELETE <url>/<job_id>  the job was cancelled or has ended:
                           stop working on it and free its staged copy
    transferd -> stager    GET <url>/<job_id>  (optional) 200 {"state", "authcode_sha256"}:
                           asked before staging again a job whose worker died

stage() fires None once the stager has accepted the request; the pipeline
then holds the job for `timeout` seconds and stages it again, with a new
authcode, if no callback came (one of max_attempts).  A stager that cannot be
reached, or answers 5xx, 408 or 429, is away: stage() fails with ServiceAway,
and the pipeline lets the job wait and asks again later (with a new authcode)
until the stager has been away for give_up_after seconds; such tries are no
attempts.  Any other refusal (4xx) fails the job at once with the stager's
own message.  transferd-stager (transferd.stagerd) is a reference stager
speaking this protocol.
"""

import math
from urllib.parse import quote

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from transferd.http import HTTPClient, answer_message, describe
from transferd.interfaces import IReconfigurable, IStager, ServiceAway
from transferd.jobs import StageResult
from transferd.tls import client_tls_policy

RETRYABLE_STATUS = frozenset({408, 429})  # 4xx answers that mean "try again later"
MAX_RETRY_AFTER = 3600.0  # a stager's Retry-After is followed up to an hour
WORKING = frozenset({"accepted", "recalling", "copying", "calling back"})  # GET <url>/<job_id>: its report is to come


@implementer(IStager, IReconfigurable)
class CallbackStager(Service):
    """Asks a stager service over HTTP to stage products; it reports back through POST /doneStaging."""

    log = Logger()
    batch_size = 1

    def __init__(self, url, public_url, reactor, clock, timeout, max_attempts, retry_delay, give_up_after=86400.0,
                 tls_policy=None, request_timeout=30.0, metrics=None):
        """url: where staging requests are POSTed (DELETE <url>/<job_id> on cancel and when a job ends).
        public_url: transferd's own URL as the stager reaches it; callbacks go to <public_url>/doneStaging.
        reactor, clock: do the network I/O, and time requests.
        timeout, max_attempts, give_up_after: the IStager attributes.
        retry_delay: the retry_after of a ServiceAway (unless the stager's Retry-After asks for longer).
        tls_policy: the IPolicyForHTTPS to use (default: the system's CAs).
        request_timeout: seconds a whole request (answer body included) may take.
        """
        self.url = url
        self.callback_url = public_url.rstrip("/") + "/doneStaging"
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.give_up_after = give_up_after
        self.retry_delay = retry_delay
        self.clock = clock
        self.tls_policy = tls_policy
        self.http = HTTPClient(reactor, clock, timeout=request_timeout, tls_policy=tls_policy,
                               headers={"Accept": "application/json"}, service="stager", metrics=metrics)
        self._work = set()  # stage() and DELETE coroutines in flight, cancelled when the service stops

    def reconfigure(self, config):
        """New [stager] cert and key (SIGHUP), presented from the next connection on."""
        from transferd.tls import reconfigure_client_credential

        if self.tls_policy is None:
            return  # an http:// stager: no certificate to present
        section = config.stager
        if reconfigure_client_credential(self.tls_policy, section.cert, section.key, "[stager] cert/key"):
            self.http.pool.closeCachedConnections()

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """The stager cannot tell at once whether a product exists: fire None."""
        return defer.succeed(None)

    def stage(self, job, authcode):
        """POST the staging request; fire None once accepted, or a failed StageResult; ServiceAway when away.

        Cancelling the Deferred stops the request and fails it with CancelledError at once (whatever
        the connection attempt cut short says: a lookup or connection cancelled may report its own error).
        """
        request = defer.Deferred.fromCoroutine(self._stage(job, authcode))
        cancelled = []

        def cancel(_):
            cancelled.append(True)
            request.cancel()

        staging = defer.Deferred(cancel)

        def settled(outcome):
            if cancelled:
                return None  # staging fails with CancelledError
            if isinstance(outcome, Failure):
                staging.errback(outcome)
            else:
                staging.callback(outcome)

        request.addBoth(settled)
        return self._track(staging)

    def still_staging(self, job):
        """GET <url>/<job_id>: True when the stager is working on the attempt whose authcode hash job holds.

        Only a 200 answer whose authcode_sha256 is the job's and whose state
        is one of WORKING counts; anything else (404, no such endpoint, an
        earlier attempt, a stager away) is False, and the job is staged again.
        """
        return self._track(defer.Deferred.fromCoroutine(self._still_staging(job)))

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
        """Cancel the requests in flight (their stage() fails with CancelledError); close the pool."""
        super().stopService()
        for work in list(self._work):
            work.cancel()
        return self.http.stop()

    # -- internals --------------------------------------------------------

    async def _stage(self, job, authcode):
        body = {"job_id": job.job_id, "product_id": job.product_id,
                "callback_url": self.callback_url, "authcode": authcode}
        try:
            answer = await self.http.request("POST", self.url, json=body)
        except defer.CancelledError:
            raise  # stage() was cancelled, or we are shutting down
        except Exception as error:
            raise ServiceAway(f"the stager at {self.url} cannot be reached: {describe(error)}",
                              self.retry_delay) from None
        if 200 <= answer.code < 300:
            self.log.info("job {job_id}: the stager at {url} accepted the staging request "
                          "(HTTP {code}); waiting for its callback",
                          job_id=job.job_id, url=self.url, code=answer.code)
            return None
        if answer.code >= 500 or answer.code in RETRYABLE_STATUS:
            raise ServiceAway(f"the stager at {self.url} cannot take requests now: HTTP {answer.code}: "
                              f"{answer_message(answer.body)}", self._retry_after(answer))
        msg = (f"the stager at {self.url} refused the request: HTTP {answer.code}: "
               f"{answer_message(answer.body)}")
        self.log.warn("job {job_id}: {msg}", job_id=job.job_id, msg=msg)
        return StageResult(success=False, msg=msg)

    async def _still_staging(self, job):
        target = self._job_url(job)
        try:
            answer = await self.http.request("GET", target)
        except defer.CancelledError:
            raise
        except Exception as error:
            self.log.info("job {job_id}: could not ask the stager at {url} about it ({error}); staging it again",
                          job_id=job.job_id, url=target, error=describe(error))
            return False
        try:
            report = answer.json() if answer.code == 200 else {}
        except ValueError:
            report = {}
        if not isinstance(report, dict):
            report = {}
        working = (report.get("state") in WORKING and bool(job.stager_callback)
                   and report.get("authcode_sha256") == job.stager_callback)
        self.log.info("job {job_id}: the stager at {url} {has} its attempt (HTTP {code}, {state})",
                      job_id=job.job_id, url=target, has="is still working on" if working else "does not have",
                      code=answer.code, state=report.get("state", "no state"))
        return working

    def _job_url(self, job):
        return self.url.rstrip("/") + "/" + quote(job.job_id, safe="")

    def _retry_after(self, answer):
        """retry_delay, or the stager's own Retry-After (in seconds) when it asks for longer."""
        try:
            asked = float(answer.header("Retry-After"))
        except ValueError:  # absent, or an HTTP date
            return self.retry_delay
        return min(max(asked, self.retry_delay), MAX_RETRY_AFTER) if math.isfinite(asked) else self.retry_delay

    def _track(self, deferred):
        self._work.add(deferred)

        def done(result):
            self._work.discard(deferred)
            return result

        return deferred.addBoth(done)

    def _forget(self, job, why):
        """DELETE <url>/<job_id> in the background: best effort, one try, outcome logged."""
        target = self._job_url(job)

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


def from_config(config, reactor, clock, store, metrics=None):
    """The callback stager from [stager] url, timeout, max_attempts, give_up_after, retry_delay (and TLS keys)
    and [api] public_url."""
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
        give_up_after=section.give_up_after,
        reactor=reactor,
        clock=clock,
        tls_policy=tls_policy,
        metrics=metrics,
    )
