"""The WLCG Tape REST API stager (`[stager] backend = taperest`).

It asks a tape system to bring products to disk through the WLCG Tape REST
API v1 (transferd.taperest.client), and learns the outcome from its poller
(transferd.taperest.poller).

Which files a product is
    The API stages files, never directories: POST /stage names each file by
    its path, and GET /stage/<id> reports on each file, without sizes.  So
    transferd learns the files of a product from the archive namespace
    itself, through a local mount of it: ``[stager] namespace_mount``, the
    directory where the tape system's namespace (dCache's NFS export, an EOS
    FUSE mount...) shows ``archive_root``.  When <namespace_mount>/P is a
    directory, product P is every file under it, each staged as
    <archive_root>/<its path relative to namespace_mount>, all in one staging
    request, with the sizes the mount shows; otherwise it is the one file
    <archive_root>/P.  Without namespace_mount, product P is the one file
    <archive_root>/P, its size unknown.  The poller finds a job's files in
    its request by path: <archive_root>/P and everything under
    <archive_root>/P/ (two jobs for the same product never share a request),
    so what it follows survives restarts with nothing more stored than the
    request id.  The job is STAGED once every one of its files is on disk,
    and ERROR as soon as one fails (its other files are then cancelled).
    The staging result names the endpoint's host as ``staged_to``,
    <archive_root>/P as ``path``, and every file with its path relative to
    archive_root (so starting with P) and its size when known.

How staging goes
    stage() lists the product (in a thread, when there is a mount) and
    queues its files.  A batcher sends ``POST <endpoint>/stage`` with the
    files of several jobs, up to bulk_size files (a product with more goes
    alone, whole), as soon as bulk_size are waiting or after a short window
    (0.2 s).  Two jobs sharing a file go in different requests, so that
    releasing one never unpins the other's copy.  The request id the tape
    system returns is stored with each job (store.record_stager_request)
    before stage() fires None ("reported later").  An endpoint that cannot
    be reached, times out or answers 5xx/408/425/429, and a namespace mount
    that is not there, are outages: the stage() calls fail with ServiceAway,
    and the pipeline keeps their jobs waiting, trying again after waits that
    grow with the outage, until the stager has been away for give_up_after
    seconds.  Any other 4xx answer fails the jobs with its RFC 7807 title and
    detail (a batch of several jobs refused with 400, 409, 413 or 422 is
    first sent again job by job, so that one bad path, or a batch too large
    for the server, does not fail other people's jobs).  Cancelling a
    stage() Deferred drops its job from the next batch, and stops the POST of
    a batch whose jobs are all cancelled.

    cancel() sends ``POST <endpoint>/stage/<id>/cancel`` for the job's files,
    free_copy() (once the job has ended) ``POST <endpoint>/release/<id>``;
    both are best effort and never raise.

Known limits: a POST /stage whose answer is lost (timeout) is sent again and
the first request is left to the tape system; a daemon killed between the
answer to POST /stage and the store update leaves its jobs without a request
id, and they are staged again when the stager timeout expires; one killed
after the store update and before the job's wait for the poller may be
staged again once the worker's lease runs out (still_staging cannot tell).
A product has one request, so one with more files than the tape system
takes in one request fails with the tape system's refusal.
"""

import dataclasses
from typing import Optional
from urllib.parse import quote

from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from transferd import jobs
from transferd.files import is_plain_name
from transferd.interfaces import IReconfigurable, IStager, ServiceAway
from transferd.jobs import StageResult
from transferd.taperest.client import Refused, TapeRestClient, Unreachable, document
from transferd.taperest.namespace import Namespace, NotStageable
from transferd.taperest.poller import POLL_CONCURRENCY, POLL_LIMIT, TapeRestPoller
from transferd.tls import client_tls_policy

BATCH_WINDOW = 0.2  # seconds a staging request waits for others to share its POST


@dataclasses.dataclass(eq=False)
class _Waiting:
    """A job waiting for its files to go out in a POST /stage (then: in the batch being sent)."""

    job: jobs.Job
    paths: tuple = ()  # its tape paths, once listed
    deferred: Optional[defer.Deferred] = None
    batch: Optional["_Batch"] = None


@dataclasses.dataclass(eq=False)
class _Batch:
    entries: list
    send: Optional[defer.Deferred] = None


@implementer(IStager, IReconfigurable)
class TapeRestStager(Service):
    """Stages products through a WLCG Tape REST API endpoint: bulk requests out; its poller learns the outcome."""

    log = Logger()

    def __init__(self, client, store, clock, bulk_size=100, poll_interval=30.0, timeout=3600.0, max_attempts=3,
                 retry_delay=2.0, give_up_after=86400.0, batch_window=BATCH_WINDOW, poll_limit=POLL_LIMIT,
                 poll_concurrency=POLL_CONCURRENCY, name=None, namespace=None, max_poll_interval=300.0):
        """client: the TapeRestClient.  store: where request ids are stored, and polled jobs taken from.
        clock: drives batching (the poller's too).  retry_delay: the retry_after of a ServiceAway.
        name: names the poller in the store.  namespace: the Namespace mount that lists products
        (None: every product is one file).
        """
        self.client = client
        self.store = store
        self.clock = clock
        self.bulk_size = bulk_size
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval  # a long recall's (transferd.polling)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.give_up_after = give_up_after
        self.batch_window = batch_window
        self.poll_limit = poll_limit
        self.poll_concurrency = poll_concurrency
        self.poller_name = name
        self.namespace = namespace
        self.accepted = 0  # stage() calls whose files wait for a batch, for tests and monitoring
        self._waiting = []  # of _Waiting, in arrival order
        self._flush_call = None
        self._busy = set()  # Deferreds of work in flight: listings, sends, cancels, releases
        self._stopped = False

    @property
    def batch_size(self):
        return self.bulk_size

    @property
    def queued(self):
        """How many stage() calls wait for the next POST /stage."""
        return len(self._waiting)

    def reconfigure(self, config):
        """New [stager] token_file, cert and key (SIGHUP)."""
        section = config.stager
        self.client.reconfigure_credentials(section.token_file, section.cert, section.key)

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """Known at once only with a namespace mount (is the product there?); else learnt when staging."""
        if self.namespace is None or not is_plain_name(product_id):
            return defer.succeed(None)
        return self.namespace.exists(product_id)

    def stage(self, job, authcode):
        """Queue the job's files for the next POST /stage; fire None once its request id is stored.

        The authcode is not needed: the outcome is polled, not called back.
        """
        if self._stopped:
            return defer.fail(defer.CancelledError("the Tape REST stager has stopped"))
        if not is_plain_name(job.product_id):
            return defer.succeed(StageResult(False, f"product id {job.product_id!r} is not a plain name"))
        entry = _Waiting(job)
        entry.deferred = defer.Deferred(lambda d: self._dropped(entry))
        if self.namespace is None:
            self._queue(entry, (self.client.path_for(job.product_id),))
        else:
            self._track(defer.Deferred.fromCoroutine(self._list(entry)))
        return entry.deferred

    def still_staging(self, job):
        """Cannot tell: a stored request id may be an earlier attempt's (see the module's known limits)."""
        return defer.succeed(False)

    def cancel(self, job):
        """Stop staging job: drop it from the next batch, or cancel its files on the tape system."""
        return self._track(defer.Deferred.fromCoroutine(self._cancel(job)))

    def free_copy(self, job):
        """The job has ended: unpin its files on the tape system."""
        if not job.stager_request or not is_plain_name(job.product_id):
            return defer.succeed(None)
        return self._track(defer.Deferred.fromCoroutine(self._on_files("release", job, "/release/")))

    def pollers(self, outcomes):
        """The poller of the stored staging requests, reporting to outcomes every poll_interval."""
        return [TapeRestPoller(self.client, self.store, self.clock, outcomes, poll_interval=self.poll_interval,
                               poll_limit=self.poll_limit, poll_concurrency=self.poll_concurrency,
                               name=self.poller_name, namespace=self.namespace,
                               max_poll_interval=self.max_poll_interval)]

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

    # -- listing and batching ----------------------------------------------

    async def _list(self, entry):
        """List the product in the namespace mount, then queue its files (or fail the stage() call)."""
        product_id = entry.job.product_id
        try:
            found = await self.namespace.files(product_id)
        except NotStageable as error:
            self._fire(entry, StageResult(False, str(error)))
            return
        except Exception as error:  # ServiceAway (no mount), or cancelled as the stager stops
            if not entry.deferred.called:
                entry.deferred.errback(error)
            return
        if not entry.deferred.called and not self._stopped:
            self._queue(entry, tuple(f"{self.client.namespace}/{relative}" for relative, _size in found))

    def _queue(self, entry, paths):
        entry.paths = paths
        self._waiting.append(entry)
        self.accepted += 1
        self._schedule()

    def _dropped(self, entry):
        """stage()'s Deferred was cancelled: forget the job, and stop its batch's POST if nobody else waits."""
        if entry in self._waiting:
            self._waiting.remove(entry)
        elif entry.batch is not None and entry.batch.send is not None:
            if all(other.deferred.called for other in entry.batch.entries if other is not entry):
                entry.batch.send.cancel()

    def _schedule(self):
        while len({path for entry in self._waiting for path in entry.paths}) >= self.bulk_size:
            self._flush()
        if self._waiting and (self._flush_call is None or not self._flush_call.active()):
            self._flush_call = self.clock.callLater(self.batch_window, self._flush_due)

    def _flush_due(self):
        self._flush_call = None
        while self._waiting and not self._stopped:
            self._flush()

    def _flush(self):
        """Send the next batch: waiting jobs sharing no file, up to bulk_size files (or one larger job)."""
        batch, paths, rest = [], set(), []
        for entry in self._waiting:
            fits = not batch or len(paths) + len(entry.paths) <= self.bulk_size
            if fits and paths.isdisjoint(entry.paths):
                batch.append(entry)
                paths.update(entry.paths)
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
        paths = [path for entry in batch.entries for path in entry.paths]
        try:
            request_id = await self.client.stage(paths)
        except Refused as refusal:
            if refusal.splittable and len(batch.entries) > 1:
                self.log.warn("Tape REST endpoint refused a batch of {count} jobs ({why}); sending them one by one",
                              count=len(batch.entries), why=refusal)
                await defer.gatherResults([self._send([entry]) for entry in batch.entries], consumeErrors=True)
                return
            for entry in batch.entries:
                self._fire(entry, StageResult(False, str(refusal)))
            return
        except Unreachable as error:
            away = ServiceAway(f"the Tape REST endpoint {self.client.shown} cannot be reached: {error}",
                               self.retry_delay)
            self.log.warn("Tape REST POST /stage of {count} file(s) failed: {error}", count=len(paths), error=away)
            self._fail(batch, away)
            return
        except Exception as error:
            self._fail(batch, error)
            return
        self.log.info("Tape REST request {request_id}: staging {count} file(s) of {jobs} job(s)",
                      request_id=request_id, count=len(paths), jobs=len(batch.entries))
        await defer.gatherResults([defer.Deferred.fromCoroutine(self._record(entry, request_id))
                                   for entry in batch.entries], consumeErrors=True)

    @staticmethod
    def _fail(batch, error):
        for entry in batch.entries:
            if not entry.deferred.called:
                entry.deferred.errback(error)

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
            self.log.info("job {job_id}: staging {count} file(s) of {product} in Tape REST request {request_id}",
                          job_id=job.job_id, count=len(entry.paths), product=job.product_id, request_id=request_id)
        else:
            # Cancelled (or ended) while its POST was in flight: stop the recall again.
            await self.client.post_paths("cancel", f"/stage/{quote(request_id, safe='')}/cancel", entry.paths,
                                         job.job_id)
        self._fire(entry, None)

    @staticmethod
    def _fire(entry, result):
        if not entry.deferred.called:
            entry.deferred.callback(result)

    # -- cancel and release -------------------------------------------------

    async def _cancel(self, job):
        for entry in [entry for entry in self._waiting if entry.job.job_id == job.job_id]:
            self._waiting.remove(entry)
            self._fire(entry, StageResult(False, f"staging of {job.product_id!r} was cancelled"))
        if job.stager_request:
            await self._on_files("cancel", job, "/stage/", "/cancel")

    async def _on_files(self, what, job, before, after=""):
        """POST <before><request id><after> {"paths": the job's files} (cancel, release), best effort."""
        tail = f"{before}{quote(job.stager_request, safe='')}{after}"
        await self.client.post_paths(what, tail, await self._paths_of(job), job.job_id)

    async def _paths_of(self, job):
        """The tape paths of the job's files: as staged, else as its request lists them, else the product's path."""
        if job.files():
            return [f"{self.client.namespace}/{staged.path}" for staged in job.files()]
        if self.namespace is not None:
            try:
                answer = await self.client.call("GET", f"/stage/{quote(job.stager_request, safe='')}")
                listed = sorted(self.client.product_files(document(answer), job.product_id))
            except (Unreachable, Refused):
                listed = []
            if listed:
                return listed
        return [self.client.path_for(job.product_id)]

    def _track(self, deferred):
        """Remember work in flight, so that stopping can cancel it."""
        self._busy.add(deferred)

        def untrack(result):
            self._busy.discard(deferred)
            return result

        return deferred.addBoth(untrack)


def from_config(config, reactor, clock, store, metrics=None):
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
                            tls_policy=tls_policy, metrics=metrics)
    namespace = Namespace(section.namespace_mount, reactor, section.retry_delay) if section.namespace_mount else None
    return TapeRestStager(
        client,
        store,
        clock,
        bulk_size=section.bulk_size,
        poll_interval=section.poll_interval,
        max_poll_interval=section.max_poll_interval,
        timeout=section.timeout,
        max_attempts=section.max_attempts,
        retry_delay=section.retry_delay,
        give_up_after=section.give_up_after,
        namespace=namespace,
    )
