"""The job pipeline: staging and transfer workers, cancellation, dead letters, reconciling.

Durability rules (DESIGN.md): the store is the source of truth and every
worker is idempotent.  A worker acts on a job only after claiming its lease,
and acts only if the job is still in the state it expects; the queue message
is acknowledged once the resulting state change is committed.  Leases are
renewed while work runs in this process, so a crashed daemon's jobs become
claimable again when its leases expire, and the reconciler re-drives them.
"""

import dataclasses
import hashlib
import hmac
import json
import secrets
import uuid

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from transferd import jobs
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


class Pipeline(Service):
    """Consumes the staging and transfer queues and moves jobs through their states."""

    log = Logger()

    def __init__(self, store, queue, stager, mover, clock, prefetch=8, lease=30.0, requeue_after=300.0,
                 stage_prefetch=None):
        self.store = store
        self.queue = queue
        self.stager = stager
        self.mover = mover
        self.clock = clock
        self.prefetch = prefetch
        # A batching stager (Tape REST) can only batch the stage() calls in flight at once.
        self.stage_prefetch = stage_prefetch or prefetch
        self.lease = lease
        self.requeue_after = requeue_after
        self.owner = f"worker-{uuid.uuid4()}"
        self.held = set()
        self._holds_to_extend = {}  # status -> job ids whose message was just confirmed
        self._hold_flush = None
        self._renewal = task.LoopingCall(self._renew_leases)
        self._renewal.clock = clock

    # -- service ----------------------------------------------------------

    def startService(self):
        super().startService()
        self.queue.on_dead_letter = self.dead_letter
        self.queue.consume(STAGING_QUEUE, self.stage, self.stage_prefetch)
        self.queue.consume(TRANSFER_QUEUE, self.transfer, self.prefetch)
        self._renewal.start(self.lease / 3, now=False)

    def stopService(self):
        super().stopService()
        if self._renewal.running:
            self._renewal.stop()
        return self.flush_holds()

    async def _renew_leases(self):
        try:
            await self.store.renew(self.owner, sorted(self.held), self.lease)
        except Exception:
            self.log.failure("could not renew job leases; they may be re-driven elsewhere")

    # -- submission -------------------------------------------------------

    async def submit(self, job):
        """Commit a new job, then publish it; a failed publish is left to the reconciler."""
        await self.store.create(job, hold_for=self.lease)
        self.log.info(
            "job {job_id} SUBMITTED: {product_id} -> {destination}",
            job_id=job.job_id, product_id=job.product_id, destination=job.destination_path,
        )
        await self.publish(STAGING_QUEUE, job.job_id, jobs.SUBMITTED)

    async def publish(self, queue, job_id, status):
        """Publish a job the caller has just marked QUEUED for one lease.

        Only once the queue has accepted the message is the QUEUED hold
        extended to requeue_after: a crash before that leaves a short hold,
        and the reconciler publishes the job again soon after.  When
        publishing fails the hold is dropped at once.
        """
        try:
            await self.queue.publish(queue, job_id)
        except Exception as error:
            self.log.warn(
                "job {job_id}: not queued for {queue} ({error}); the reconciler will retry",
                job_id=job_id, queue=queue, error=error,
            )
            await self._best_effort("drop the queued hold", self.store.release, job_id, jobs.QUEUED)
            return False
        self._extend_hold(status, job_id)
        return True

    def _extend_hold(self, status, job_id):
        """Extend a published job's QUEUED hold to requeue_after, batched.

        The holds of the jobs confirmed within a few milliseconds are extended
        by one statement, and nobody waits for it: a daemon that dies first
        leaves short holds, and the reconciler publishes those jobs again.
        """
        self._holds_to_extend.setdefault(status, set()).add(job_id)
        if self._hold_flush is None or not self._hold_flush.active():
            self._hold_flush = self.clock.callLater(0.005, self.flush_holds)

    def flush_holds(self):
        """Extend the pending QUEUED holds now; fires when the store has done it."""
        if self._hold_flush is not None and self._hold_flush.active():
            self._hold_flush.cancel()
        batches, self._holds_to_extend = self._holds_to_extend, {}
        done = []
        for status, job_ids in batches.items():
            d = self.store.hold_queued(status, sorted(job_ids), self.requeue_after)
            done.append(d.addErrback(lambda failure: self.log.failure("could not extend queued holds", failure)))
        return defer.DeferredList(done)

    # -- staging ----------------------------------------------------------

    async def stage(self, job_id):
        """Queue handler: stage a SUBMITTED job, or re-stage a STAGING one nobody holds."""
        await self._claim_and_run(job_id, (jobs.SUBMITTED, jobs.STAGING), self._stage_claimed)

    async def _stage_claimed(self, job):
        attempt = job.stage_attempts + 1
        if attempt > self.stager.max_attempts:
            await self.store.transition(
                job.job_id, job.status, jobs.ERROR,
                {"detailed_status": f"staging timed out after {job.stage_attempts} attempt(s) "
                                    f"of {self.stager.timeout:g}s each"},
            )
            return
        authcode = secrets.token_urlsafe(32)
        fields = {"stager_callback": hash_authcode(authcode), "stage_attempts": attempt}
        asked_at = self.clock.seconds()  # the authcode expires at asked_at + stager.timeout
        if job.status == jobs.SUBMITTED:
            started = await self.store.transition(
                job.job_id, jobs.SUBMITTED, jobs.STAGING, fields, hold_for=self.lease, owner=self.owner
            )
        else:
            fields["time_staging"] = jobs.utc_from_seconds(self.clock.seconds())
            started = await self.store.update(job.job_id, jobs.STAGING, fields)
            self.log.info("job {job_id} staging again (attempt {attempt})", job_id=job.job_id, attempt=attempt)
        if not started:
            return
        job = dataclasses.replace(job, status=jobs.STAGING, stage_attempts=attempt, stager_callback=fields["stager_callback"])
        result = await self.stager.stage(job, authcode)
        if result is None:
            # The stager reports later (callback or polling): it holds the job
            # until the authcode expires, then the reconciler stages it again.
            left = max(0.0, self.stager.timeout - (self.clock.seconds() - asked_at))
            await self.store.release(job.job_id, self.owner, hold_for=left)
            return
        await self.staging_done(job, result)

    async def staging_done(self, job, result):
        """Record a staging outcome for a STAGING job; fire with True when it was recorded."""
        if result.success:
            fields = {
                "stager_hostname": result.staged_to,
                "stager_path": result.path,
                "stager_status": result.msg or "staged",
                "staged_files": json.dumps([f.to_dict() for f in result.files]) if result.files else None,
            }
            done = await self.store.transition(
                job.job_id, jobs.STAGING, jobs.STAGED, fields, hold_for=self.lease, owner=jobs.QUEUED
            )
            if done:
                await self.publish(TRANSFER_QUEUE, job.job_id, jobs.STAGED)
            else:
                await self._release_staged(job)
            return done
        reason = result.msg or "no reason given"
        done = await self.store.transition(
            job.job_id, jobs.STAGING, jobs.ERROR,
            {"detailed_status": f"staging failed: {reason}", "stager_status": reason},
        )
        return done

    # -- transfer ---------------------------------------------------------

    async def transfer(self, job_id):
        """Queue handler: transfer a STAGED job, or resume a TRANSFERRING one nobody holds."""
        await self._claim_and_run(job_id, (jobs.STAGED, jobs.TRANSFERRING), self._transfer_claimed)

    async def _transfer_claimed(self, job):
        if self.mover.asynchronous:
            await self._submit_transfer(job)
            return
        if job.status == jobs.STAGED:
            if not await self.store.transition(
                job.job_id, jobs.STAGED, jobs.TRANSFERRING, hold_for=self.lease, owner=self.owner
            ):
                return
            job = dataclasses.replace(job, status=jobs.TRANSFERRING)
        else:
            self.log.info("job {job_id} transfer resumed", job_id=job.job_id)
        await self.transfer_done(job, await self.mover.transfer(job))

    async def _submit_transfer(self, job):
        """Hand the job to an asynchronous mover (FTS3); its poller reports the outcome.

        The job stays STAGED until the mover has accepted it, so a transfer
        service that is down leaves it STAGED (the queue retries).  Submitting
        again is safe: asynchronous movers make submission idempotent.
        """
        try:
            result = await self.mover.transfer(job)
        except Exception as error:
            retry_later = getattr(error, "retry_later", None)
            if retry_later is None:
                raise
            # The transfer service is away (FTS down, credentials to renew): no fault
            # of this job.  It stays as it is, held retry_later seconds, then the
            # reconciler re-drives it; an outage never dead-letters it.
            self.log.warn(
                "job {job_id}: not submitted ({error}); trying again in {delay:g}s",
                job_id=job.job_id, error=error, delay=retry_later,
            )
            await self.store.release(job.job_id, self.owner, hold_for=retry_later)
            return
        if result is not None and not result.success:
            await self.store.transition(
                job.job_id, job.status, jobs.ERROR,
                {"detailed_status": f"transfer failed: {result.msg or 'no reason given'}",
                 "fts_details": result.details},
            )
            await self._release_staged(job)
        elif job.status == jobs.STAGED:
            if not await self.store.transition(
                job.job_id, jobs.STAGED, jobs.TRANSFERRING, hold_for=self.mover.timeout
            ):
                current = await self.store.get(job.job_id)
                if current is not None and current.status == jobs.CANCELLED:
                    # Cancelled while the mover was submitting: stop what it started.
                    await self._best_effort("tell the mover to stop", self.mover.cancel, current)
        else:
            await self.store.release(job.job_id, self.owner, hold_for=self.mover.timeout)

    async def transfer_done(self, job, result):
        """Record a transfer outcome for a TRANSFERRING job."""
        if result.success:
            done = await self.store.transition(
                job.job_id, jobs.TRANSFERRING, jobs.SUCCESS,
                {"detailed_status": result.msg or "delivered", "fts_details": result.details},
            )
        else:
            done = await self.store.transition(
                job.job_id, jobs.TRANSFERRING, jobs.ERROR,
                {"detailed_status": f"transfer failed: {result.msg or 'no reason given'}",
                 "fts_details": result.details},
            )
        await self._release_staged(job)
        return done

    # -- cancellation and failures ---------------------------------------

    async def cancel(self, job_id):
        """Cancel a job; fire with the job as it was, raise JobNotFound or JobFinished."""
        while True:
            job = await self.store.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.terminal:
                raise JobFinished(job)
            if await self.store.transition(
                job_id, job.status, jobs.CANCELLED, {"detailed_status": "cancelled at the user's request"}
            ):
                break
        if job.status == jobs.STAGING:
            await self._best_effort("tell the stager to stop", self.stager.cancel, job)
        elif job.status == jobs.TRANSFERRING:
            await self._best_effort("tell the mover to stop", self.mover.cancel, job)
        if job.status in (jobs.STAGING, jobs.STAGED, jobs.TRANSFERRING):
            await self._release_staged(job)
        return job

    async def dead_letter(self, queue, job_id, reason):
        """A message failed max_deliveries times: its job ends in ERROR with the reason."""
        job = await self.store.get(job_id)
        if job is not None and not job.terminal:
            await self.store.transition(job_id, job.status, jobs.ERROR, {"detailed_status": reason})

    # -- helpers ----------------------------------------------------------

    async def _claim_and_run(self, job_id, states, work):
        """Run work(job) if the job is in one of states and this worker wins its lease.

        Anything else (unknown job, another state, someone else's lease) is a
        duplicate or stale message: nothing to do.  The lease is renewed while
        work runs and given back if it fails, so a redelivery can retry.
        """
        job = await self.store.get(job_id)
        if job is None or job.status not in states:
            return
        if not await self.store.claim(job_id, job.status, self.owner, self.lease):
            return
        self.held.add(job_id)
        try:
            await work(job)
        except Exception:
            await self._best_effort("release the lease", self.store.release, job_id, self.owner)
            raise
        finally:
            self.held.discard(job_id)

    async def _release_staged(self, job):
        await self._best_effort("release the staged copy", self.stager.release, job)

    async def _best_effort(self, what, call, *args):
        try:
            await call(*args)
        except Exception:
            self.log.failure("job {job_id}: could not " + what, job_id=getattr(args[0], "job_id", args[0]))


class Reconciler:
    """Re-drives every active job nobody holds, so restarts and lost messages lose nothing."""

    log = Logger()

    def __init__(self, store, pipeline, batch=1000, queued_lost=False):
        self.store = store
        self.pipeline = pipeline
        self.batch = batch
        # The first pass after start also re-drives QUEUED jobs when the queue
        # does not survive restarts (memory://): their messages died with it.
        self._queued_lost = queued_lost

    async def run_once(self):
        """One pass; returns how many jobs it re-drove.  Never raises (timer-safe)."""
        try:
            return await self._pass()
        except Exception:
            self.log.failure("reconciler pass failed; will try again")
            return 0

    async def _pass(self):
        queued_too, self._queued_lost = self._queued_lost, False
        stuck = await self.store.unleased(jobs.ACTIVE, self.batch, queued_too=queued_too)
        count = 0
        for job in stuck:
            # Mark it QUEUED so later passes leave it alone while its message is on the way.
            if not await self.store.claim(job.job_id, job.status, jobs.QUEUED, self.pipeline.lease):
                continue
            queue = STAGING_QUEUE if job.status in (jobs.SUBMITTED, jobs.STAGING) else TRANSFER_QUEUE
            if await self.pipeline.publish(queue, job.job_id, job.status):
                count += 1
        if count:
            self.log.info("reconciler re-drove {count} job(s)", count=count)
        return count
