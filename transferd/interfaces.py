"""The four seams of transferd.

Each seam has an embedded implementation and a production one; all of them
pass the same contract suite in tests/ (tests/contract_*.py).  Every method
that does I/O returns a Deferred.
"""

from zope.interface import Attribute, Interface


class IJobStore(Interface):
    """Durable job records: the source of truth.

    Every state change is a compare-and-set on the current status; a change
    that matches no row returns False and has no effect.  Times come from the
    store's clock so tests can drive them.
    """

    def create(job, hold_for=None):
        """Insert a new SUBMITTED job (time_submitted set by the store).

        With hold_for, the job is marked QUEUED for that many seconds: its
        queue message is on the way, so the reconciler leaves it alone.
        """

    def get(job_id):
        """Fire with the Job, or None when there is no such job."""

    def transition(job_id, old, new, fields=None, hold_for=None, owner=None):
        """Compare-and-set old -> new, setting time_<new> and the given fields.

        Raises InvalidTransition for a move the state machine forbids.  The
        lease is cleared, or with hold_for set to (owner, now + hold_for).
        Fires with True when the row changed, False when the job was not in
        state old.
        """

    def update(job_id, status, fields):
        """Set fields on a job that is still in state status; fire with True/False."""

    def claim(job_id, status, owner, hold_for):
        """Take the lease of a job in state status whose lease is free, expired or QUEUED.

        Fires with True when owner now holds it until now + hold_for.  A lease
        without owner (a job waiting on a stager or FTS) blocks claims until
        it expires.
        """

    def hold_queued(status, job_ids, hold_for):
        """Mark the jobs among job_ids still in status and not held by a worker QUEUED for hold_for seconds.

        One statement for many jobs (their messages were just confirmed); fires with the count.
        """

    def renew(owner, job_ids, hold_for):
        """Extend the leases that owner holds on job_ids; fire with the count renewed."""

    def release(job_id, owner, hold_for=None):
        """Give up owner's lease (kept, ownerless, for hold_for seconds if given)."""

    def unleased(statuses, limit, queued_too=False):
        """Fire with up to limit Jobs in the given states whose lease is free or expired.

        queued_too also returns QUEUED jobs (after a restart that lost an
        in-process queue).
        """

    def claim_batch(status, owner, hold_for, limit, having=None):
        """Take up to limit jobs in status for one polling cycle (least recently polled first).

        A poller's lease is separate from the workers' lease: a job claimed
        here is polled by this owner only until now + hold_for, so several
        daemons polling at once each poll different jobs.  having names a
        column that must be set (e.g. fts_jobid).  Fires with the Jobs taken.
        """

    def close():
        """Release connections; fires when done."""


class IJobQueue(Interface):
    """Wake-up signals carrying job ids; the store stays the source of truth.

    Implementations are IService providers: connections open in startService
    and close in stopService.
    """

    def publish(queue, job_id):
        """Fire once the message is durably accepted; fail if it could not be."""

    def consume(queue, handler, prefetch):
        """Deliver each job id to handler(job_id) -> Deferred, at most prefetch at once.

        The message is acknowledged when handler's Deferred succeeds.  When it
        fails the message is delivered again, up to max_deliveries in all;
        then it is dead-lettered and on_dead_letter(queue, job_id, reason) is
        called.  Consumers survive reconnections.
        """

    on_dead_letter = Attribute("callable(queue, job_id, reason) -> Deferred, or None")


# Backend modules (transferd.stagers.*, transferd.movers.*) provide
# from_config(config, clock, store) building the stager or mover from the
# configuration.  A stager or mover that needs timers of its own (pollers)
# may also have services(pipeline) returning IService objects; the daemon
# starts them with everything else, and they report outcomes through
# pipeline.staging_done(job, result) / pipeline.transfer_done(job, result).


class IStager(Interface):
    """Brings a product from the archive (tape) to disk."""

    timeout = Attribute("seconds a staging attempt may take before it is retried")
    max_attempts = Attribute("staging attempts before the job goes to ERROR")

    def check(product_id):
        """Fire with True/False when the product's existence is known at once, else None."""

    def stage(job, authcode):
        """Start staging job's product.

        Fire with a StageResult when staging finished in-line, or with None
        when the stager will report later (POST /doneStaging carrying authcode,
        or polling).
        """

    def cancel(job):
        """Tell the stager to stop working on job (best effort)."""

    def release(job):
        """The job has ended; the staged copy may be freed (best effort)."""

    def close():
        """Release connections and pending timers; fires when done."""


class IMover(Interface):
    """Moves a staged product to its destination."""

    schemes = Attribute("frozenset of destination URL schemes this mover can write")
    asynchronous = Attribute(
        "False: transfer() moves the bytes and fires with the outcome, the job TRANSFERRING meanwhile. "
        "True: transfer() submits (idempotently) while the job is still STAGED and fires with None once "
        "accepted, or a failed TransferResult; a poller reports the outcome through pipeline.transfer_done."
    )
    timeout = Attribute("asynchronous movers: seconds a transfer may take; the job is held that long")

    def transfer(job):
        """Move or submit job's staged product (see asynchronous).

        An asynchronous mover whose service is away may fail with an exception
        carrying retry_later (seconds): the job is then left as it is and
        re-driven after that long, without counting against max_deliveries.
        """

    def cancel(job):
        """Stop the transfer of job (best effort)."""

    def close():
        """Release connections and pending timers; fires when done."""
