"""The job pipeline: staging and transfer workers, outcomes, cancellation, dead letters, reconciling.

Durability rules (docs/architecture.md): the store is the source of truth and
every worker is idempotent.  A worker acts on a job only after taking its
lease (transferd.leases), and only if the job is still in the state it
expects; the queue message is acknowledged once the resulting state change is
committed.  Leases are renewed while work runs in this process, so a crashed
daemon's jobs become free when its leases expire, and the reconciler
re-drives them.

Outages (docs/architecture.md, "Outages"): a stager or transfer service that
is away (ServiceAway) leaves its jobs waiting, with backoff, until it has been
away for the backend's give_up_after; our own store being away
(StoreUnavailable) is no job's fault and counts against none.  A job whose
step crashes the daemon every time ends in ERROR once its lease was taken
more than max_deliveries times without being given back.
"""

import collections
import dataclasses
import functools
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
from transferd.interfaces import IOutcomes, ServiceAway, StoreUnavailable
from transferd.queue import STAGING_QUEUE, TRANSFER_QUEUE
from transferd.scheduler import Policy

# At most this many seconds between tries of a service that is away (the wait grows with the outage).
AWAY_WAIT_CAP = 300.0


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

    def __init__(self, store, queue, stager, mover, clock, prefetch=8, lease=30.0, requeue_after=300.0,
                 max_deliveries=5, metrics=None, daemon_id=None, policy=None):
        self.store = store
        self.policy = policy if policy is not None else Policy()  # shares and limits (transferd.scheduler)
        self.metrics = metrics  # transferd.metrics.Metrics: leases renewed, dead letters
        self.queue = queue
        self.stager = stager
        self.mover = mover
        self.clock = clock
        self.prefetch = prefetch
        # A batching stager (Tape REST) can only batch the stage() calls in flight at once.
        self.stage_prefetch = max(prefetch, stager.batch_size)
        self.lease = lease
        self.requeue_after = requeue_after
        self.max_deliveries = max_deliveries  # leases taken and never given back before a job is failed
        daemon_id = str(daemon_id or uuid.uuid4())
        self.owner = leases.worker_owner(daemon_id)  # names its daemon (transferd.fleet)
        # Who its workers' changes are by, in job histories: the daemon, as GET /api/v1/daemons lists it.
        self.actor = f"transferd on {socket.gethostname()} (daemon {daemon_id})"
        self.held = set()
        self._unreturned = set()  # job ids whose lease could not be given back while the store was away
        self._isolation = Isolation()  # jobs workers died on run alone
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

    def drain(self):
        """Take no new jobs from the queues (transferd.fleet); the ones in hand go on."""
        self.queue.stop_consuming()

    def undrain(self):
        if self.running:
            self.queue.resume_consuming()

    async def _stop(self):
        # A staging attempt may wait as long as a tape recall: it is not
        # waited for.  Its lease is given back and the job is staged again
        # after the restart (here or by another daemon).  No new message
        # starts one meanwhile.
        self.queue.stop_consuming()
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
            renewed = await self.store.renew_leases(self.owner, sorted(self.held), self.lease)
            if self.metrics is not None:
                self.metrics.leases_renewed.inc(renewed)
            for job_id in sorted(self._unreturned):
                await self._give_back(job_id)
        except StoreUnavailable as error:
            self.log.warn("could not renew job leases ({error}); they may be re-driven elsewhere", error=error)
        except Exception:
            self.log.failure("could not renew job leases; they may be re-driven elsewhere")

    # -- submission -------------------------------------------------------

    async def submit(self, job, identity=None):
        """Commit a new job; it waits in SUBMITTED for the scheduler to release it (transferd.scheduler)."""
        await self.submit_many([job], job.submitter or "anonymous user", identity=identity)

    async def submit_many(self, new_jobs, actor, submission=None, identity=None):
        """Commit new jobs in one transaction (with submission's answer, when given).

        Each counts against the share of identity (its submitter or group).
        Fails with the store's SubmissionExists, creating nothing, when that
        submission is stored already, and with TooManyWaiting when the share
        would have more jobs waiting than [limits] max_waiting_per_submitter.
        The jobs wait in SUBMITTED, free; the commit wakes the scheduler.
        """
        policy = self.policy
        share = policy.share_of(identity)
        new_jobs = [dataclasses.replace(job, share=share) for job in new_jobs]
        limit = policy.limits.max_waiting_per_submitter
        await self.store.create_many(new_jobs, actor=actor, submission=submission,
                                     max_waiting=(limit, policy.limits.retry_after) if limit is not None else None)
        if len(new_jobs) == 1:
            job = new_jobs[0]
            self.log.info("job {job_id} SUBMITTED: {product_id} -> {destination}",
                          job_id=job.job_id, product_id=job.product_id, destination=job.destination_path)
        elif new_jobs:
            self.log.info(
                "{count} job(s) SUBMITTED in one batch by {actor}, {first} to {last}",
                count=len(new_jobs), actor=actor, first=new_jobs[0].job_id, last=new_jobs[-1].job_id,
            )

    async def publish_released(self, queue, status, job_ids):
        """Publish the jobs a scheduling pass has just put under a queue hold of one lease, in one batch.

        Once the queue has them their holds are extended to requeue_after
        (batched, _extend_hold).  When publishing fails the holds are made to
        run out at once: the reconciler gives the jobs back to the scheduler.
        """
        try:
            await self.queue.publish_many(queue, job_ids)
        except Exception as error:
            self.log.warn("{count} job(s) not queued for {queue} ({error}); the reconciler will retry",
                          count=len(job_ids), queue=queue, error=error)
            try:
                await self.store.hold_in_queue(status, job_ids, 0)  # a hold that has run out
            except Exception:
                self.log.failure("could not drop the queue holds; they run out within one lease")
            return
        for job_id in job_ids:
            self._extend_hold(status, job_id)

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
            done.append(d.addErrback(self._holds_not_extended))
        return defer.DeferredList(done)

    def _holds_not_extended(self, failure):
        """The holds stay short: the reconciler publishes those jobs again, which is harmless."""
        if failure.check(StoreUnavailable):
            self.log.warn("could not extend queue holds: {error}", error=failure.value)
        else:
            self.log.failure("could not extend queue holds", failure)

    # -- staging ----------------------------------------------------------

    def stage(self, job_id):
        """Queue handler: stage a SUBMITTED job, or re-stage a STAGING one nobody holds."""
        # A job no worker took before is leased and moved to STAGING in one store call (store.claim).
        authcode = secrets.token_urlsafe(32)
        start = (jobs.SUBMITTED, jobs.STAGING, {"stager_callback": hash_authcode(authcode), "stage_attempts": 1},
                 self.actor)
        first = (start, ("deliveries", "stage_attempts"), functools.partial(self._stage_taken, authcode=authcode))
        staging = defer.Deferred.fromCoroutine(
            self._take_and_run(job_id, STAGING_QUEUE, (jobs.SUBMITTED, jobs.STAGING), self._stage_taken, first))
        self._staging.add(staging)
        staging.addBoth(self._staging_ended, staging)
        return staging

    def _staging_ended(self, result, staging):
        self._staging.discard(staging)
        if isinstance(result, defer.Failure) and result.check(defer.CancelledError) and not self.running:
            return None  # stopped by shutdown: the job is free again, nothing to redeliver
        return result

    async def _stage_taken(self, job, authcode=None):
        """Stage a job taken in SUBMITTED or STAGING.  authcode: the job was moved to STAGING with its hash as it
        was taken (store.claim); it only needs the stager asked."""
        if authcode is None:
            if await self._still_with_the_stager(job):
                return
            begun = await self._begin_staging(job)
            if begun is None:
                return
            job, authcode = begun
        asked_at = job.time_staging.timestamp()  # the authcode expires at asked_at + stager.timeout
        try:
            result = await self.stager.stage(job, authcode)
        except ServiceAway as away:
            # The stager never took this attempt: it does not count.
            await self._wait_for(job, away, self.stager, "staging", {"stage_attempts": job.stage_attempts - 1})
            return
        if result is None:
            # The outcome comes later (callback or polling): the job waits for
            # the stager until the authcode expires, then the reconciler stages it again.
            await self._service_back(job, "the stager")
            left = max(0.0, self.stager.timeout - (self.clock.seconds() - asked_at))
            await self.store.end_lease(job.job_id, self.owner, then=leases.waiting(left))
            return
        await self.staging_done(job, result)

    async def _still_with_the_stager(self, job):
        """A worker died on this STAGING job: when the stager still works on the attempt the job holds (accepted
        just before that worker stopped), wait for its report until the attempt times out, rather than stage it
        twice.  True when the job waits so."""
        if job.status != jobs.STAGING or job.deliveries <= 1 or job.time_staging is None:
            return False
        left = self.stager.timeout - (self.clock.seconds() - job.time_staging.timestamp())
        if left <= 0 or not await self.stager.still_staging(job):
            return False
        self.log.info("job {job_id}: the stager is still working on the attempt a stopped worker asked for; "
                      "waiting up to {left:.0f}s for its report", job_id=job.job_id, left=left)
        await self.store.end_lease(job.job_id, self.owner, then=leases.waiting(left))
        return True

    async def _begin_staging(self, job):
        """A staging attempt for a taken job: SUBMITTED -> STAGING, or a STAGING job's next attempt; fire with
        (the job as it is now, its new authcode), or None (it ended in ERROR, or was no longer there)."""
        attempt = job.stage_attempts + 1
        if attempt > self.stager.max_attempts:
            await self.store.transition(
                job.job_id, job.status, jobs.ERROR,
                {"detailed_status": f"staging timed out after {job.stage_attempts} attempt(s) "
                                    f"of {self.stager.timeout:g}s each"},
                actor=self.actor,
            )
            return None
        authcode = secrets.token_urlsafe(32)
        fields = {"stager_callback": hash_authcode(authcode), "stage_attempts": attempt}
        now = jobs.utc_from_seconds(self.clock.seconds())
        if job.status == jobs.SUBMITTED:
            started = await self.store.transition(
                job.job_id, jobs.SUBMITTED, jobs.STAGING, fields, hold=leases.worker(self.owner, self.lease),
                actor=self.actor,
            )
        else:
            fields["time_staging"] = now
            # While the stager is away its tries are not attempts: the history says so once, in _wait_for.
            note = None if job.time_away else (self.actor, f"staging attempt {attempt} of {self.stager.max_attempts}")
            started = await self.store.update(job.job_id, jobs.STAGING, fields, note=note)
            if job.time_away:
                self.log.info("job {job_id}: asking the stager again", job_id=job.job_id)
            else:
                self.log.info("job {job_id} staging again (attempt {attempt})", job_id=job.job_id, attempt=attempt)
        if not started:
            return None
        time_away = job.time_away if job.status == jobs.STAGING else None
        return dataclasses.replace(job, status=jobs.STAGING, stage_attempts=attempt, time_staging=now,
                                   stager_callback=fields["stager_callback"], time_away=time_away), authcode

    # -- outcomes (IOutcomes) -----------------------------------------------

    async def staging_done(self, job, result, actor="the stager"):
        """Record a staging outcome for a STAGING job; fire with True when it was recorded."""
        return job.job_id in await self.stagings_done([(job, result)], actor)

    async def stagings_done(self, outcomes, actor="the stager"):
        """Record the outcomes [(job, StageResult)] of STAGING jobs; fire with the ids recorded.

        The successes move by one store transition_many (a tape request's
        files, recalled together: a few statements for all of them), the
        failures by another.  A staged copy nobody records (the job was
        cancelled meanwhile) is freed.
        """
        changes = {jobs.STAGED: {}, jobs.ERROR: {}}
        for job, result in outcomes:
            if result.success:
                # Free: it waits in STAGED for the scheduler to release it to the transfer queue.
                changes[jobs.STAGED][job.job_id] = {
                    "detailed_status": None,  # a "waiting: ..." from an outage is over
                    "stager_hostname": result.staged_to,
                    "stager_path": result.path,
                    "stager_status": result.msg or "staged",
                    "staged_files": json.dumps([f.to_dict() for f in result.files]) if result.files else None,
                }
            else:
                reason = result.msg or "no reason given"
                changes[jobs.ERROR][job.job_id] = {"detailed_status": f"staging failed: {reason}",
                                                   "stager_status": reason}
        recorded = await self._move_many(jobs.STAGING, changes, actor)
        unrecorded = [job for job, _ in outcomes if job.job_id in changes[jobs.STAGED] and job.job_id not in recorded]
        if unrecorded:
            await self._free_copies(unrecorded)
        return recorded

    async def transfer_done(self, job, result, actor="the mover"):
        """Record a transfer outcome for a TRANSFERRING job; fire with True when it was recorded."""
        return job.job_id in await self.transfers_done([(job, result)], actor)

    async def transfers_done(self, outcomes, actor="the mover"):
        """Record the outcomes [(job, TransferResult)] of TRANSFERRING jobs; fire with the ids recorded.

        The successes move by one store transition_many, the failures by
        another (an FTS poll's finished jobs: a few statements for all of
        them), then every job's staged copy is freed.
        """
        changes = {jobs.SUCCESS: {}, jobs.ERROR: {}}
        for job, result in outcomes:
            if result.success:
                changes[jobs.SUCCESS][job.job_id] = {"detailed_status": result.msg or "delivered",
                                                     "fts_details": result.details}
            else:
                changes[jobs.ERROR][job.job_id] = {
                    "detailed_status": f"transfer failed: {result.msg or 'no reason given'}",
                    "fts_details": result.details}
        recorded = await self._move_many(jobs.TRANSFERRING, changes, actor)
        await self._free_copies([job for job, _ in outcomes])
        return recorded

    async def _move_many(self, old, changes, actor):
        """changes: {new state: {job_id: fields}}; one store transition_many per new state; the ids that moved."""
        moved = set()
        for new, fields in changes.items():
            if fields:
                moved |= await self.store.transition_many(old, new, fields, actor=actor)
        return moved

    # -- transfer ---------------------------------------------------------

    async def transfer(self, job_id):
        """Queue handler: transfer a STAGED job, or resume a TRANSFERRING one nobody holds."""
        await self._take_and_run(job_id, TRANSFER_QUEUE, (jobs.STAGED, jobs.TRANSFERRING), self._transfer_taken)

    async def _transfer_taken(self, job):
        if self.mover.asynchronous:
            await self._submit_transfer(job)
            return
        if job.status == jobs.STAGED:
            if not await self.store.transition(
                job.job_id, jobs.STAGED, jobs.TRANSFERRING, {"detailed_status": None},
                hold=leases.worker(self.owner, self.lease), actor=self.actor,
            ):
                return
            job = dataclasses.replace(job, status=jobs.TRANSFERRING, time_away=None)
        else:
            self.log.info("job {job_id} transfer resumed", job_id=job.job_id)
        try:
            result = await self.mover.transfer(job)
        except ServiceAway as away:
            await self._wait_for(job, away, self.mover, "transfer")
            return
        await self.transfer_done(job, result)

    async def _submit_transfer(self, job):
        """Hand the job to an asynchronous mover (FTS3); its poller reports the outcome.

        The job stays STAGED until the mover has accepted it, so a transfer
        service that is away leaves it STAGED.  Submitting again is safe:
        asynchronous movers make submission idempotent.  A job cancelled while
        it was being submitted has what the mover started stopped here, once.
        """
        try:
            result = await self.mover.transfer(job)
        except ServiceAway as away:
            await self._wait_for(job, away, self.mover, "transfer")
            return
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
            handed_over = await self.store.transition(job.job_id, jobs.STAGED, jobs.TRANSFERRING,
                                                      {"detailed_status": None}, hold=waiting, actor=self.actor)
        else:
            await self._service_back(job, "the transfer service")
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
        if self.metrics is not None:
            self.metrics.dead_letters.labels(queue).inc()
        job = await self.store.get(job_id)
        if job is not None and not job.terminal:
            await self.store.transition(job_id, job.status, jobs.ERROR, {"detailed_status": reason},
                                        actor=f"the {queue} queue")

    # -- helpers ----------------------------------------------------------

    async def _take_and_run(self, job_id, step, states, work, first=None):
        """Run work(job) if the job is in one of states and this worker can take its lease.

        Anything else (unknown job, another state, someone else's lease) is a
        duplicate or stale message: nothing to do.  The lease is renewed while
        work runs and given back if it fails, so a redelivery can retry.
        Taking the lease counts a delivery in the job's row and giving it back
        takes it back, so the count left over is the workers that crashed: a
        job whose step keeps crashing the daemon ends in ERROR (in _take).  A
        job a worker died on before runs alone (Isolation), so that crashing
        again it takes no other job down with it; whatever waits for its turn
        waits without the lease, so a crash meanwhile does not count against
        it.  When the store is away the lease is given back once it is back,
        and the failure (StoreUnavailable) reaches the queue, which does not
        count it.  first: (start, fresh, work_started) for store.claim: a
        job in start's old state no worker took before is leased and moved
        on in one store call, and work_started(job) runs instead (_take_first).
        """
        if job_id in self._unreturned:
            await self.store.end_lease(job_id, self.owner)  # our own lease, from before the store went away
            self._unreturned.discard(job_id)
        if first is None:
            job = await self._take(job_id, step, states)
        else:
            job = await self._take_first(job_id, step, states, first)
        if job is None:
            return
        suspect = job.deliveries > 1
        turn = self._isolation.enter(suspect)
        if not turn.called:
            try:
                await self.store.end_lease(job_id, self.owner)  # no lease while it waits, so a crash does not count
            except BaseException as error:
                self._isolation.give_up(turn, suspect)
                if isinstance(error, StoreUnavailable):
                    self._unreturned.add(job_id)
                raise
            await turn
            job = None  # taken again below, now that it is its turn
        try:
            if job is None:
                job = await self._take(job_id, step, states)
                if job is None:
                    return
            if suspect:
                self.log.info("job {job_id}: a worker died on it {count} time(s) in the {step} step; running it alone",
                              job_id=job_id, count=job.deliveries - 1, step=step)
            await self._run_leased(job, work)
        finally:
            self._isolation.leave(suspect)

    async def _take(self, job_id, step, states):
        """Take the job's lease (counting a delivery); None, and the job in ERROR, when workers died on it too often."""
        return await self._unless_crashed_on(await self.store.take_lease(job_id, states, self.owner, self.lease),
                                             step)

    async def _take_first(self, job_id, step, states, first):
        """Take the job's lease and, when it is fresh in the first step's old state, move it on in the same store
        call (store.claim) and run work_started at once, as an ordinary step: nothing runs alone meanwhile.
        Fire with a job taken but not moved, for the usual way; None when done or nothing to do."""
        start, fresh, work_started = first
        turn = self._isolation.enter(False)
        if not turn.called:  # a suspect's step runs alone, or waits to: the usual way
            self._isolation.give_up(turn, False)
            return await self._take(job_id, step, states)
        try:
            job, started = await self.store.claim(job_id, states, self.owner, self.lease, start, fresh)
            if started:
                await self._run_leased(job, work_started)
                return None
        finally:
            self._isolation.leave(False)
        return await self._unless_crashed_on(job, step)

    async def _unless_crashed_on(self, job, step):
        """The job taken, or None, and the job in ERROR, when workers died on it too often."""
        if job is not None and job.deliveries > self.max_deliveries:
            await self._crashed_too_often(job, step)
            return None
        return job

    async def _run_leased(self, job, work):
        """work(job), the lease renewed meanwhile and given back when it fails (once the store is back, if away)."""
        self.held.add(job.job_id)
        try:
            await work(job)
        except StoreUnavailable:
            self._unreturned.add(job.job_id)
            raise
        except BaseException:
            await self._give_back(job.job_id)
            raise
        finally:
            self.held.discard(job.job_id)

    async def _give_back(self, job_id):
        """End this worker's lease on the job; while the store is away, remember to do it once it is back."""
        try:
            await self.store.end_lease(job_id, self.owner)
        except StoreUnavailable:
            self._unreturned.add(job_id)
        except Exception:
            self.log.failure("job {job_id}: could not give back the lease", job_id=job_id)
        else:
            self._unreturned.discard(job_id)

    async def _crashed_too_often(self, job, step):
        """The job's lease was taken more than max_deliveries times and never given back: each time the daemon died."""
        reason = (f"failed {job.deliveries - 1} times in the {step} step: the daemon stopped (crashed or was"
                  f" killed) while working on it each time")
        if await self.store.transition(job.job_id, job.status, jobs.ERROR, {"detailed_status": reason},
                                       actor=self.actor):
            if job.status != jobs.SUBMITTED:
                await self._free_copy(job)

    async def _wait_for(self, job, away, backend, step, fields=None):
        """The stager or mover is away: the job waits, saying why, or ends in ERROR once it was away too long.

        The wait is half as long as the service has been away so far (so the
        job resumes within half the outage's length once it is back), at
        least the backend's retry_after and at most AWAY_WAIT_CAP, and never
        past the moment to give up (give_up_after after the job first found
        it away).
        The outage's start goes into the job's history; detailed_status says
        how it stands at every try.  fields: what else to set on the job.
        """
        now = self.clock.seconds()
        since = job.time_away.timestamp() if job.time_away is not None else now
        away_for = now - since
        limit = backend.give_up_after
        if limit is not None and away_for >= limit:
            fields = dict(fields or {}, detailed_status=f"{step} failed: {away} (gave up after {_duration(away_for)}"
                                                       f" of trying)")
            if await self.store.transition(job.job_id, job.status, jobs.ERROR, fields, actor=self.actor):
                if step == "transfer":
                    await self._free_copy(job)
            return
        wait = min(AWAY_WAIT_CAP, max(away.retry_after, away_for / 2))
        if limit is not None:
            wait = min(wait, limit - away_for)
        detail = f"waiting: {away}; trying again in {_duration(wait)}"
        if limit is not None:
            detail += f", giving up {_duration(limit - away_for)} from now"
        fields = dict(fields or {}, time_away=jobs.utc_from_seconds(since), detailed_status=detail)
        note = None
        if job.time_away is None:  # the outage starts, as far as this job is concerned
            note = (self.actor, f"{away}; waiting" + (f" (for up to {_duration(limit)})" if limit is not None else ""))
        self.log.warn("job {job_id}: {error}; trying again in {wait:.1f}s", job_id=job.job_id, error=away, wait=wait)
        if await self.store.update(job.job_id, job.status, fields, note=note):
            await self.store.end_lease(job.job_id, self.owner, then=leases.waiting(wait))

    async def _service_back(self, job, service):
        """The service the job waited for took it: the outage is over for this job (its history says so)."""
        if job.time_away is None:
            return
        away_for = self.clock.seconds() - job.time_away.timestamp()
        await self.store.update(job.job_id, job.status, {"time_away": None, "detailed_status": None},
                                note=(self.actor, f"{service} is back after {_duration(away_for)}"))

    async def _free_copy(self, job):
        await self._free_copies([job])

    async def _free_copies(self, ended):
        """Free the ended jobs' staged copies; once gone, a job no longer shows its stager_path."""

        async def free(job):
            try:
                await self.stager.free_copy(job)
            except Exception:
                self.log.failure("job {job_id}: could not free the staged copy", job_id=job.job_id)
                return None
            return job.job_id

        freed = await defer.gatherResults([defer.Deferred.fromCoroutine(free(job)) for job in ended])
        freed = [job_id for job_id in freed if job_id is not None]
        if freed:
            await self._best_effort("record that the staged copy is freed", self.store.copies_freed, freed,
                                    named=", ".join(freed))

    async def _best_effort(self, what, call, *args, named=None):
        """call(*args), its failure logged (named: the jobs the message names; by default args[0]'s)."""
        job_id = named or getattr(args[0], "job_id", args[0])
        try:
            await call(*args)
        except StoreUnavailable as error:
            self.log.warn("job {job_id}: could not " + what + ": {error}", job_id=job_id, error=error)
        except Exception:
            self.log.failure("job {job_id}: could not " + what, job_id=job_id)


class Isolation:
    """Ordinary steps run together; a suspect's step (a worker died on its job before) runs alone.

    A step that crashes the daemon takes down whatever runs beside it; run
    alone, it costs only its own job a delivery.  Turns are given in order of
    arrival, so a waiting suspect is not starved by ordinary steps arriving
    after it.
    """

    def __init__(self):
        self._ordinary = 0  # ordinary steps running
        self._alone = False  # a suspect's step runs
        self._waiting = collections.deque()  # (suspect, Deferred) not given their turn yet

    def enter(self, suspect):
        """A Deferred firing when it is this step's turn (at once, usually); cancelling it gives the turn up."""
        entry = None

        def give_up(_):
            self._waiting.remove(entry)
            self._pump()

        turn = defer.Deferred(give_up)
        entry = (suspect, turn)
        self._waiting.append(entry)
        self._pump()
        return turn

    def give_up(self, turn, suspect):
        """The step will not run after all: its turn goes to the next, whether it had come or not."""
        if turn.called:
            self.leave(suspect)
        else:
            turn.addErrback(lambda failure: failure.trap(defer.CancelledError))
            turn.cancel()

    def leave(self, suspect):
        """The step that entered with suspect has ended."""
        if suspect:
            self._alone = False
        else:
            self._ordinary -= 1
        self._pump()

    def _pump(self):
        while self._waiting and not self._alone:
            suspect, turn = self._waiting[0]
            if suspect:
                if self._ordinary:
                    return
                self._alone = True
            else:
                self._ordinary += 1
            self._waiting.popleft()
            turn.callback(None)


def _duration(seconds):
    """Seconds in words: 45s, 3m 20s, 2h 5m, 1d 0h."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


class Reconciler:
    """Re-drives every active job nobody holds, so restarts and lost messages lose nothing."""

    log = Logger()

    def __init__(self, store, pipeline, queue_durable, batch=1000, metrics=None):
        self.store = store
        self.metrics = metrics  # transferd.metrics.Metrics: jobs re-driven
        self.pipeline = pipeline
        self.batch = batch
        # The first pass after start also re-drives jobs under a queue hold
        # when the queue does not survive restarts: their messages died with it.
        self._queue_holds_void = not queue_durable
        self.draining = False  # a drained daemon re-drives nothing (transferd.fleet); the others do

    def drain(self):
        self.draining = True

    def undrain(self):
        self.draining = False

    async def run_once(self):
        """One pass; returns how many jobs it re-drove.  Never raises (timer-safe)."""
        if self.draining:
            return 0
        try:
            return await self._pass()
        except StoreUnavailable as error:
            self.log.warn("reconciler pass failed ({error}); will try again", error=error)
            return 0
        except Exception:
            self.log.failure("reconciler pass failed; will try again")
            return 0

    async def _pass(self):
        # Once, however the pass ends: holds it misses run out within requeue_after anyway.
        void, self._queue_holds_void = self._queue_holds_void, False
        # Jobs waiting for the scheduler whose lease ran out go back to it: it releases them again.
        freed = await self.store.release_to_scheduler((jobs.SUBMITTED, jobs.STAGED), self.batch,
                                                      include_queue_holds=void)
        stuck = await self.store.jobs_to_redrive((jobs.STAGING, jobs.TRANSFERRING), self.batch,
                                                 include_queue_holds=void)
        count = 0
        for job in stuck:
            # A queue hold, so later passes leave it alone while its message is on the way.
            if await self.store.take_lease(job.job_id, [job.status], leases.IN_QUEUE, self.pipeline.lease) is None:
                continue
            queue = STAGING_QUEUE if job.status == jobs.STAGING else TRANSFER_QUEUE
            if not await self.pipeline.publish(queue, job.job_id, job.status):
                break  # the queue is away: the others would fail too; the next pass tries again
            count += 1
        count += freed
        if count:
            self.log.info("reconciler re-drove {count} job(s)", count=count)
            if self.metrics is not None:
                self.metrics.redriven.inc(count)
        return count
