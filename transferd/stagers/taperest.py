"""The WLCG Tape REST API stager (`[stager] backend = taperest`).

It asks a tape system to bring products to disk through the WLCG Tape REST
API v1 (transferd.taperest.client), and learns the outcome from its poller
(transferd.taperest.poller).  Product ``P`` is the one file
``<archive_root>/P`` of the tape namespace; directory products are not
supported (a tape system recalls files, not trees).  The staging result
names the endpoint's host as ``staged_to``, that path as ``path``, and one
staged file named after the product (its size is not known: the API does
not report sizes).

How staging goes
    stage() queues the job.  A batcher sends ``POST <endpoint>/stage`` with
    the files of up to bulk_size jobs at once, as soon as bulk_size are
    waiting or after a short window (0.2 s).  Two jobs for the same file go
    in different requests, so that releasing one never unpins the other's
    copy.  The request id the tape system returns is stored with the job
    (store.record_stager_request) before stage() fires None ("reported
    later").  Connection errors, timeouts and 5xx/408/429 answers are retried
    after retry_delay seconds, doubling each time with jitter, up to
    max_attempts requests; then the jobs fail, saying the endpoint could not
    be reached.  Any other 4xx answer fails them with its RFC 7807 title and
    detail (a batch of several files refused with 400, 409, 413 or 422 is
    first sent again file by file, so that one bad path, or a batch too large
    for the server, does not fail other people's jobs).  Cancelling a
    stage() Deferred drops its job from the next batch, and stops the POST of
    a batch whose jobs are all cancelled.

    cancel() sends ``POST <endpoint>/stage/<id>/cancel`` for the job's file,
    free_copy() (once the job has ended) ``POST <endpoint>/release/<id>``;
    both are best effort and never raise.

Known limits: a POST /stage whose answer is lost (timeout) is sent again and
the first request is left to the tape system; a daemon killed between the
answer to POST /stage and the store update leaves its jobs without a request
id, and they are staged again when the stager timeout expires.
"""

import dataclasses
import random
from typing import Optional
from urllib.parse import quote

from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from transferd import jobs
from transferd.files import is_plain_name
from transferd.interfaces import IStager
from transferd.jobs import StageResult
from transferd.taperest.client import Refused, TapeRestClient, Unreachable, problem
from transferd.taperest.poller import POLL_CONCURRENCY, POLL_LIMIT, TapeRestPoller
from transferd.tls import client_tls_policy

BATCH_WINDOW = 0.2  # seconds a staging request waits for others to share its POST


@dataclasses.dataclass(eq=False)
class _Waiting:
    """A job waiting for its file to go out in a POST /stage (then: in the batch being sent)."""

    job: jobs.Job
    path: str
    deferred: Optional[defer.Deferred] = None
    batch: Optional["_Batch"] = None


@dataclasses.dataclass(eq=False)
class _Batch:
    entries: list
    send: Optional[defer.Deferred] = None


@implementer(IStager)
class TapeRestStager(Service):
    """Stages products through a WLCG Tape REST API endpoint: bulk requests out; its poller learns the outcome."""

    log = Logger()

    def __init__(self, client, store, clock, bulk_size=100, poll_interval=30.0, timeout=3600.0, max_attempts=3,
                 retry_delay=2.0, batch_window=BATCH_WINDOW, poll_limit=POLL_LIMIT,
                 poll_concurrency=POLL_CONCURRENCY, name=None):
        """client: the TapeRestClient.  store: where request ids are stored, and polled jobs taken from.
        clock: drives batching and retries (the poller's too).  name: names the poller in the store.
        """
        self.client = client
        self.store = store
        self.clock = clock
        self.bulk_size = bulk_size
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.batch_window = batch_window
        self.poll_limit = poll_limit
        self.poll_concurrency = poll_concurrency
        self.poller_name = name
        self.accepted = 0  # stage() calls taken into a batch, for tests and monitoring
        self._waiting = []  # of _Waiting, in arrival order
        self._flush_call = None
        self._busy = set()  # Deferreds of work in flight: sends, cancels, releases
        self._stopped = False

    @property
    def batch_size(self):
        return self.bulk_size

    @property
    def queued(self):
        """How many stage() calls wait for the next POST /stage."""
        return len(self._waiting)

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """The tape system is not asked at submission: existence is learnt when staging."""
        return defer.succeed(None)

    def stage(self, job, authcode):
        """Queue the job's file for the next POST /stage; fire None once its request id is stored.

        The authcode is not needed: the outcome is polled, not called back.
        """
        if self._stopped:
            return defer.fail(defer.CancelledError("the Tape REST stager has stopped"))
        if not is_plain_name(job.product_id):
            return defer.succeed(StageResult(False, f"product id {job.product_id!r} is not a plain name"))
        entry = _Waiting(job, self.client.path_for(job.product_id))
        entry.deferred = defer.Deferred(lambda d: self._dropped(entry))
        self._waiting.append(entry)
        self.accepted += 1
        self._schedule()
        return entry.deferred

    def cancel(self, job):
        """Stop staging job: drop it from the next batch, or cancel its file on the tape system."""
        return self._track(defer.Deferred.fromCoroutine(self._cancel(job)))

    def free_copy(self, job):
        """The job has ended: unpin its file on the tape system."""
        if not job.stager_request or not is_plain_name(job.product_id):
            return defer.succeed(None)
        return self._track(defer.Deferred.fromCoroutine(self._best_effort(
            "release", job, f"/release/{quote(job.stager_request, safe='')}",
            self.client.path_for(job.product_id))))

    def pollers(self, outcomes):
        """The poller of the stored staging requests, reporting to outcomes every poll_interval."""
        return [TapeRestPoller(self.client, self.store, self.clock, outcomes, poll_interval=self.poll_interval,
                               poll_limit=self.poll_limit, poll_concurrency=self.poll_concurrency, name=self.poller_name)]

    def stopService(self):
        """Fail the stage() calls still waiting, cancel the work in flight, close the connections."""
        super().stopService()
        self._stopped = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        waiting, self._waiting = self._waiting, []
        for entry in waiting:
            entry.deferred.cancel()
        for busy in list(self._busy):
            busy.cancel()
        return self.client.stop()

    # -- batching ---------------------------------------------------------

    def _dropped(self, entry):
        """stage()'s Deferred was cancelled: forget the job, and stop its batch's POST if nobody else waits."""
        if entry in self._waiting:
            self._waiting.remove(entry)
        elif entry.batch is not None and entry.batch.send is not None:
            if all(other.deferred.called for other in entry.batch.entries if other is not entry):
                entry.batch.send.cancel()

    def _schedule(self):
        while self._distinct_waiting() >= self.bulk_size:
            self._flush()
        if self._waiting and (self._flush_call is None or not self._flush_call.active()):
            self._flush_call = self.clock.callLater(self.batch_window, self._flush_due)

    def _distinct_waiting(self):
        return len({entry.path for entry in self._waiting})

    def _flush_due(self):
        self._flush_call = None
        while self._waiting and not self._stopped:
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
            self._send(batch)

    def _send(self, entries):
        """POST /stage for the entries, in the background; each stage() fires once its job is recorded."""
        batch = _Batch(entries)
        for entry in entries:
            entry.batch = batch
        batch.send = self._track(defer.Deferred.fromCoroutine(self._post(batch)))
        return batch.send

    async def _post(self, batch):
        try:
            request_id = await self._submit([entry.path for entry in batch.entries])
        except Refused as refusal:
            if refusal.splittable and len(batch.entries) > 1:
                self.log.warn("Tape REST endpoint refused a batch of {count} files ({why}); sending them one by one",
                              count=len(batch.entries), why=refusal)
                await defer.gatherResults([self._send([entry]) for entry in batch.entries], consumeErrors=True)
                return
            for entry in batch.entries:
                self._fire(entry, StageResult(False, str(refusal)))
            return
        except Exception as error:
            for entry in batch.entries:
                if not entry.deferred.called:
                    entry.deferred.errback(error)
            return
        self.log.info("Tape REST request {request_id}: staging {count} file(s)", request_id=request_id,
                      count=len(batch.entries))
        await defer.gatherResults([defer.Deferred.fromCoroutine(self._record(entry, request_id))
                                   for entry in batch.entries], consumeErrors=True)

    async def _record(self, entry, request_id):
        job = entry.job
        try:
            stored = await self.store.record_stager_request(job.job_id, request_id)
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
            await self._best_effort("cancel", job, f"/stage/{quote(request_id, safe='')}/cancel", entry.path)
        self._fire(entry, None)

    @staticmethod
    def _fire(entry, result):
        if not entry.deferred.called:
            entry.deferred.callback(result)

    async def _submit(self, paths):
        """POST /stage with retries; return the request id, raise Refused when it cannot be had."""
        why = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self.client.stage(paths)
            except Unreachable as error:
                why = str(error)
            if attempt < self.max_attempts:
                delay = self.retry_delay * 2 ** (attempt - 1) * random.uniform(1.0, 1.5)
                self.log.warn("Tape REST POST /stage failed ({why}); attempt {next} in {delay:.1f}s",
                              why=why, next=attempt + 1, delay=delay)
                await task.deferLater(self.clock, delay, lambda: None)
        raise Refused(f"the Tape REST endpoint {self.client.shown} could not be reached after "
                      f"{self.max_attempts} attempt(s): {why}")

    # -- cancel and release -------------------------------------------------

    async def _cancel(self, job):
        for entry in [entry for entry in self._waiting if entry.job.job_id == job.job_id]:
            self._waiting.remove(entry)
            self._fire(entry, StageResult(False, f"staging of {job.product_id!r} was cancelled"))
        if job.stager_request:
            await self._best_effort("cancel", job, f"/stage/{quote(job.stager_request, safe='')}/cancel",
                                    self.client.path_for(job.product_id))

    async def _best_effort(self, what, job, tail, path):
        try:
            answer = await self.client.call("POST", tail, {"paths": [path]})
            if not 200 <= answer.code < 300:
                self.log.warn("job {job_id}: Tape REST {what} answered HTTP {code}: {why}", job_id=job.job_id,
                              what=what, code=answer.code, why=problem(answer))
        except defer.CancelledError:
            pass
        except Exception as error:
            self.log.warn("job {job_id}: Tape REST {what} failed: {error}", job_id=job.job_id, what=what,
                          error=error)

    def _track(self, deferred):
        """Remember work in flight, so that stopping can cancel it."""
        self._busy.add(deferred)

        def untrack(result):
            self._busy.discard(deferred)
            return result

        return deferred.addBoth(untrack)


def from_config(config, reactor, clock, store):
    """The Tape REST stager from [stager]: url and an absolute archive_root are required."""
    from transferd.config import ConfigError

    section = config.stager  # transferd.config has checked url, archive_root, key and token_file
    tls_policy = None
    if section.cert or section.ca_path:
        try:
            tls_policy = client_tls_policy(section.ca_path, section.cert, section.key)
        except (OSError, ValueError, SSL.Error, crypto.Error) as error:
            raise ConfigError(f"[stager] cert/key/ca_path cannot be used: {error}") from None
    client = TapeRestClient(section.url, section.archive_root, reactor, clock, token_file=section.token_file,
                            tls_policy=tls_policy)
    return TapeRestStager(
        client,
        store,
        clock,
        bulk_size=section.bulk_size,
        poll_interval=section.poll_interval,
        timeout=section.timeout,
        max_attempts=section.max_attempts,
        retry_delay=section.retry_delay,
    )
