"""The job pipeline: staging and transfer workers, outcomes, cancellation, dead letters, reconciling.

Durability rules (docs/architecture.md): the store is the source of truth and
every worker is idempotent.  A worker acts on a job only after taking its
lease (transferd.leases), and only if the job is still in the state it
expects; the queue message is acknowledged once the resulting state change is
committed.  Leases are renewed while work runs in this process, so a crashed
daemon's jobs become free when its leases expire, and the reconciler
re-drives them.
"""

import dataclasses
import hashlib
import hmac
import json
import secrets
import socket
import uuid

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from transferd import jobs, leases
from transferd.interfaces import IOutcomes, ServiceAway
from transferd.queue import STAGING_QUEUE, TRANSFER_QUEUE


def hash_authcode(authcode):
    return hashlib.sha256(authcode.encode("utf-8")).hexdigest()


def authcode_matches(authcode, stored_hash):
    """Constant-time comparison of a presented code against the stored hash."""
    if not stored_hash or not isinstance(authcode, str):
        return False
    return hmac.compare_digest(hash_authcode(authcode), stored_hash)


class JobNotFound(LookupError):
    pass


class JobFinished(Exception):
    """The job is already in a terminal state."""

    def __init__(self, job):
        super().__init__(f"job {job.job_id} has already ended ({job.status})")
        self.job = job


@implementer(IOutcomes)
class Pipeline(Service):
    """Consumes the staging and transfer queues and moves jobs through their states.

    It is also where stagers, movers and their pollers report outcomes (IOutcomes).
    """

    log = Logger()

    def __init__(self, store, queue, stager, mover, clock, prefetch=8, lease=30.0, requeue_after=300.0):
        self.store = store
        self.queue = queue
        self.stager = stager
        self.mover = mover
        self.clock = clock
        self.prefetch = prefetch
        # A batching stager (Tape REST) can only batch the stage() calls in flight at once.
        self.stage_prefetch = max(prefetch, stager.batch_size)
        self.lease = lease
        self.requeue_after = requeue_after
        self.owner = f"worker-{uuid.uuid4()}"
        self.actor = f"transferd on {socket.gethostname()}"  # who its workers' changes are by, in job histories
        self.held = set()
        self._staging = set()  # staging handlers in flight, cancelled when the daemon stops
        self._holds_to_extend = {}  # status -> job ids whose message was just confirmed
        self._hold_flush = None
        self._renewal = task.LoopingCall(self._renew_leases)
        self._renewal.clock = clock

    # -- service ----------------------------------------------------------

    def startService(self):
        super().startService()
        self.queue.consume(STAGING_QUEUE, self.stage, self.stage_prefetch, self.dead_letter)
        self.queue.consume(TRANSFER_QUEUE, self.transfer, self.prefetch, self.dead_letter)
        self._renewal.start(self.lease / 3, now=False)

    async def _stop(self):
        # A staging attempt may wait as long as a tape recall: it is not
        # waited for.  Its lease is given back and the job is staged again
        # after the restart (here or by another daemon).
        for staging in list(self._staging):
            staging.cancel()
        await defer.DeferredList(list(self._staging))
        if self._renewal.running:
            self._renewal.stop()
        await self.flush_holds()

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _renew_leases(self):
        try:
            await self.store.renew_leases(self.owner, sorted(self.held), self.lease)
        except Exception:
            self.log.failure("could not renew job leases; they may be re-driven elsewhere")

    # -- submission -------------------------------------------------------

    async def submit(self, job):
        """Commit a new job, then publish it; a failed publish is left to the reconciler."""
        await self.store.create(job, hold=leases.in_queue(self.lease), actor=job.submitter or "anonymous user")
        self.log.info(
            "job {job_id} SUBMITTED: {product_id} -> {destination}",
            job_id=job.job_id, product_id=job.product_id, destination=job.destination_path,
        )
        await self.publish(STAGING_QUEUE, job.job_id, jobs.SUBMITTED)

    async def publish(self, queue, job_id, status):
        """Publish a job the caller has just put under a queue hold of one lease.

        Only once the queue has accepted the message is the hold extended to
        requeue_after: a crash before that leaves a short hold, and the
        reconciler publishes the job again soon after.  When publishing fails
        the hold is dropped at once.
        """
        try:
            await self.queue.publish(queue, job_id)
        except Exception as error:
            self.log.warn(
                "job {job_id}: not queued for {queue} ({error}); the reconciler will retry",
                job_id=job_id, queue=queue, error=error,
            )
            await self._best_effort("drop the queue hold", self.store.end_lease, job_id, leases.IN_QUEUE)
            return False
        self._extend_hold(status, job_id)
        return True

    def _extend_hold(self, status, job_id):
        """Extend a published job's queue hold to requeue_after, batched.

        The holds of the jobs confirmed within a few milliseconds are extended
        by one statement, and nobody waits for it: a daemon that dies first
        leaves short holds, and the reconciler publishes those jobs again.
        """
        self._holds_to_extend.setdefault(status, set()).add(job_id)
        if self._hold_flush is None or not self._hold_flush.active():
            self._hold_flush = self.clock.callLater(0.005, self.flush_holds)

    def flush_holds(self):
        """Extend the pending queue holds now; fires when the store has done it."""
        if self._hold_flush is not None and self._hold_flush.active():
            self._hold_flush.cancel()
        batches, self._holds_to_extend = self._holds_to_extend, {}
        done = []
        for status, job_ids in batches.items():
            d = self.store.hold_in_queue(status, sorted(job_ids), self.requeue_after)
            done.append(d.addErrback(lambda failure: self.log.failure("could not extend queue holds", failure)))
        return defer.DeferredList(done)

    # -- staging ----------------------------------------------------------

    def stage(self, job_id):
        """Queue handler: stage a SUBMITTED job, or re-stage a STAGING one nobody holds."""
        staging = defer.Deferred.fromCoroutine(
            self._take_and_run(job_id, (jobs.SUBMITTED, jobs.STAGING), self._stage_taken))
        self._staging.add(staging)
        staging.addBoth(self._staging_ended, staging)
        return staging

    def _staging_ended(self, result, staging):
        self._staging.discard(staging)
        if isinstance(result, defer.Failure) and result.check(defer.CancelledError) and not self.running:
            return None  # stopped by shutdown: the job is free again, nothing to redeliver
        return result

    async def _stage_taken(self, job):
        attempt = job.stage_attempts + 1
        if attempt > self.stager.max_attempts:
            await self.store.transition(
                job.job_id, job.status, jobs.ERROR,
                {"detailed_status": f"staging timed out after {job.stage_attempts} attempt(s) "
                                    f"of {self.stager.timeout:g}s each"},
                actor=self.actor,
            )
            return
        authcode = secrets.token_urlsafe(32)
        fields = {"stager_callback": hash_authcode(authcode), "stage_attempts": attempt}
        asked_at = self.clock.seconds()  # the authcode expires at asked_at + stager.timeout
        if job.status == jobs.SUBMITTED:
            started = await self.store.transition(
                job.job_id, jobs.SUBMITTED, jobs.STAGING, fields, hold=leases.worker(self.owner, self.lease),
                actor=self.actor,
            )
        else:
            fields["time_staging"] = jobs.utc_from_seconds(self.clock.seconds())
            started = await self.store.update(job.job_id, jobs.STAGING, fields,
                                              note=(self.actor, f"staging attempt {attempt} of {self.stager.max_attempts}"))
            self.log.info("job {job_id} staging again (attempt {attempt})", job_id=job.job_id, attempt=attempt)
        if not started:
            return
        job = dataclasses.replace(job, status=jobs.STAGING, stage_attempts=attempt, stager_callback=fields["stager_callback"])
        result = await self.stager.stage(job, authcode)
        if result is None:
            # The outcome comes later (callback or polling): the job waits for
            # the stager until the authcode expires, then the reconciler stages it again.
            left = max(0.0, self.stager.timeout - (self.clock.seconds() - asked_at))
            await self.store.end_lease(job.job_id, self.owner, then=leases.waiting(left))
            return
        await self.staging_done(job, result)

    # -- outcomes (IOutcomes) -----------------------------------------------

    async def staging_done(self, job, result, actor="the stager"):
        """Record a staging outcome for a STAGING job; fire with True when it was recorded."""
        if result.success:
            fields = {
                "stager_hostname": result.staged_to,
                "stager_path": result.path,
                "stager_status": result.msg or "staged",
                "staged_files": json.dumps([f.to_dict() for f in result.files]) if result.files else None,
            }
            done = await self.store.transition(
                job.job_id, jobs.STAGING, jobs.STAGED, fields, hold=leases.in_queue(self.lease), actor=actor
            )
            if done:
                await self.publish(TRANSFER_QUEUE, job.job_id, jobs.STAGED)
            else:
                await self._free_copy(job)
            return done
        reason = result.msg or "no reason given"
        return await self.store.transition(
            job.job_id, jobs.STAGING, jobs.ERROR,
            {"detailed_status": f"staging failed: {reason}", "stager_status": reason}, actor=actor,
        )

    async def transfer_done(self, job, result, actor="the mover"):
        """Record a transfer outcome for a TRANSFERRING job; fire with True when it was recorded."""
        if result.success:
            done = await self.store.transition(
                job.job_id, jobs.TRANSFERRING, jobs.SUCCESS,
                {"detailed_status": result.msg or "delivered", "fts_details": result.details}, actor=actor,
            )
        else:
            done = await self.store.transition(
                job.job_id, jobs.TRANSFERRING, jobs.ERROR,
                {"detailed_status": f"transfer failed: {result.msg or 'no reason given'}",
                 "fts_details": result.details}, actor=actor,
            )
        await self._free_copy(job)
        return done

    # -- transfer ---------------------------------------------------------

    async def transfer(self, job_id):
        """Queue handler: transfer a STAGED job, or resume a TRANSFERRING one nobody holds."""
        await self._take_and_run(job_id, (jobs.STAGED, jobs.TRANSFERRING), self._transfer_taken)

    async def _transfer_taken(self, job):
        if self.mover.asynchronous:
            await self._submit_transfer(job)
            return
        if job.status == jobs.STAGED:
            if not await self.store.transition(
                job.job_id, jobs.STAGED, jobs.TRANSFERRING, hold=leases.worker(self.owner, self.lease),
                actor=self.actor,
            ):
                return
            job = dataclasses.replace(job, status=jobs.TRANSFERRING)
        else:
            self.log.info("job {job_id} transfer resumed", job_id=job.job_id)
        await self.transfer_done(job, await self.mover.transfer(job))

    async def _submit_transfer(self, job):
        """Hand the job to an asynchronous mover (FTS3); its poller reports the outcome.

        The job stays STAGED until the mover has accepted it, so a transfer
        service that is away leaves it STAGED.  Submitting again is safe:
        asynchronous movers make submission idempotent.  A job cancelled while
        it was being submitted has what the mover started stopped here, once.
        """
        result = await self.mover.transfer(job)
        if result is not None and not result.success:
            await self.store.transition(
                job.job_id, job.status, jobs.ERROR,
                {"detailed_status": f"transfer failed: {result.msg or 'no reason given'}",
                 "fts_details": result.details}, actor=self.actor,
            )
            await self._free_copy(job)
            return
        waiting = leases.waiting(self.mover.timeout)
        if job.status == jobs.STAGED:
            handed_over = await self.store.transition(job.job_id, jobs.STAGED, jobs.TRANSFERRING, hold=waiting,
                                                      actor=self.actor)
        else:
            handed_over = await self.store.end_lease(job.job_id, self.owner, then=waiting)
        if not handed_over:
            current = await self.store.get(job.job_id)
            if current is not None and current.status == jobs.CANCELLED:
                self.log.info("job {job_id} was cancelled while being submitted; stopping its transfer",
                              job_id=job.job_id)
                await self._best_effort("tell the mover to stop", self.mover.cancel, current)

    # -- cancellation and failures ---------------------------------------

    async def cancel(self, job_id, actor="a user"):
        """Cancel a job; fire with the job as it was, raise JobNotFound or JobFinished."""
        while True:
            job = await self.store.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.terminal:
                raise JobFinished(job)
            if await self.store.transition(
                job_id, job.status, jobs.CANCELLED, {"detailed_status": "cancelled at the user's request"},
                actor=actor,
            ):
                break
        if job.status == jobs.STAGING:
            await self._best_effort("tell the stager to stop", self.stager.cancel, job)
        elif job.status == jobs.TRANSFERRING:
            await self._best_effort("tell the mover to stop", self.mover.cancel, job)
        if job.status in (jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING):
            await self._free_copy(job)
        return job

    async def dead_letter(self, queue, job_id, reason):
        """A message failed max_deliveries times: its job ends in ERROR with the reason."""
        job = await self.store.get(job_id)
        if job is not None and not job.terminal:
            await self.store.transition(job_id, job.status, jobs.ERROR, {"detailed_status": reason},
                                        actor=f"the {queue} queue")

    # -- helpers ----------------------------------------------------------

    async def _take_and_run(self, job_id, states, work):
        """Run work(job) if the job is in one of states and this worker can take its lease.

        Anything else (unknown job, another state, someone else's lease) is a
        duplicate or stale message: nothing to do.  The lease is renewed while
        work runs and given back if it fails, so a redelivery can retry.  A
        remote service that is away (ServiceAway) leaves the job waiting that
        long, without counting against its deliveries.
        """
        job = await self.store.take_lease(job_id, states, self.owner, self.lease)
        if job is None:
            return
        self.held.add(job_id)
        try:
            await work(job)
        except ServiceAway as away:
            self.log.warn("job {job_id}: {error}; trying again in {delay:g}s",
                          job_id=job_id, error=away, delay=away.retry_after)
            await self._best_effort("leave it waiting", self.store.end_lease, job_id, self.owner,
                                    leases.waiting(away.retry_after))
        except BaseException:
            await self._best_effort("give back the lease", self.store.end_lease, job_id, self.owner)
            raise
        finally:
            self.held.discard(job_id)

    async def _free_copy(self, job):
        await self._best_effort("free the staged copy", self.stager.free_copy, job)

    async def _best_effort(self, what, call, *args):
        try:
            await call(*args)
        except Exception:
            self.log.failure("job {job_id}: could not " + what, job_id=getattr(args[0], "job_id", args[0]))


class Reconciler:
    """Re-drives every active job nobody holds, so restarts and lost messages lose nothing."""

    log = Logger()

    def __init__(self, store, pipeline, queue_durable, batch=1000):
        self.store = store
        self.pipeline = pipeline
        self.batch = batch
        # The first pass after start also re-drives jobs under a queue hold
        # when the queue does not survive restarts: their messages died with it.
        self._queue_holds_void = not queue_durable

    async def run_once(self):
        """One pass; returns how many jobs it re-drove.  Never raises (timer-safe)."""
        try:
            return await self._pass()
        except Exception:
            self.log.failure("reconciler pass failed; will try again")
            return 0

    async def _pass(self):
        include_queue_holds, self._queue_holds_void = self._queue_holds_void, False
        stuck = await self.store.jobs_to_redrive(jobs.ACTIVE, self.batch, include_queue_holds=include_queue_holds)
        count = 0
        for job in stuck:
            # A queue hold, so later passes leave it alone while its message is on the way.
            if await self.store.take_lease(job.job_id, [job.status], leases.IN_QUEUE, self.pipeline.lease) is None:
                continue
            queue = STAGING_QUEUE if job.status in (jobs.SUBMITTED, jobs.STAGING) else TRANSFER_QUEUE
            if await self.pipeline.publish(queue, job.job_id, job.status):
                count += 1
        if count:
            self.log.info("reconciler re-drove {count} job(s)", count=count)
        return count
