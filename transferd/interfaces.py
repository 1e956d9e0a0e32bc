"""The seams of transferd (docs/architecture.md, "Seams").

Each seam has an embedded implementation and a production one; all of them
pass the same contract suite (tests/contract_*.py).  Every method that does
I/O returns a Deferred.  Store, queue, stager and mover are services: the
daemon starts them in order and stops them in reverse (transferd.service),
so each opens its connections in startService and closes them in
stopService.  Backends get what they need when they are built
(transferd.wiring); nothing is attached to them later.
"""

from twisted.application.service import IService
from zope.interface import Attribute, Interface


class ServiceAway(Exception):
    """A remote service (FTS, a stager, a tape system) cannot be used now; try again in retry_after seconds.

    No fault of the job: it stays as it is and waits (the pipeline backs off,
    starting at retry_after), and the attempt never counts against its
    deliveries or attempts.  Only once the service has been away for the
    backend's give_up_after seconds does the job end in ERROR.  The message
    says what is away and why, in words an operator understands.
    """

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(ConnectionError):
    """The job store cannot be used now (its database is down or unreachable).

    An outage of our own, never a job's fault: the API answers 503 with
    Retry-After, and a queue handler failing with it is delivered again
    without counting the delivery.  The operation may or may not have taken
    effect when the store says so; the caller re-reads, or the reconciler
    re-drives.
    """

    retry_after = 5  # seconds the API tells clients to wait (Retry-After)


class IJobStore(IService):
    """Durable job records: the source of truth.

    startService migrates the schema (fires when it is current); stopService
    closes the connections.  Every state change is a compare-and-set on the
    current status: one that matches no row fires False and changes nothing.
    Times come from the store's clock.  Leases are explained in
    transferd.leases; `hold` arguments are leases.Hold values, None meaning
    "leave the job free".
    """

    def schema_version():
        """Fire with the schema version the database is at (0: none yet)."""

    def create(job, hold=None, actor=None):
        """Insert a new SUBMITTED job (time_submitted set by the store), under hold.

        actor (here and below): who makes the change, for the job's history,
        which the store writes in the same transaction as the change.
        """

    def create_many(jobs, hold=None, actor=None, submission=None, max_waiting=None):
        """Insert new SUBMITTED jobs with their history rows in one transaction, all under hold.

        submission (a jobs.Submission): also store its answer, in the same
        transaction; when one with the same submitter and submission_id is
        stored already, fail with SubmissionExists and create nothing.
        max_waiting (limit, retry_after): fail with
        transferd.scheduler.TooManyWaiting, creating nothing, when a share
        would have more than limit jobs waiting in SUBMITTED.
        """

    def submission(submitter, submission_id):
        """Fire with the answer stored for (submitter, submission_id), or None."""

    def get(job_id):
        """Fire with the Job, or None when there is no such job."""

    def list_jobs(job_filter, limit, after=None):
        """Fire with up to limit Jobs matching job_filter (a jobs.JobFilter), newest first.

        Newest first is time_submitted descending, then job_id descending.
        after: (time_submitted, job_id) of the last job of the previous page;
        the page continues strictly after it, so pages never skip or repeat
        a job however many are created meanwhile.
        """

    def count_before(status, column, moment):
        """Fire with how many jobs in status have column (time_submitted or time_updated) before moment."""

    def count_by_status(submitter=None):
        """Fire with {status: how many jobs are in it}, states without jobs left out (for /metrics).

        Read from counts the store keeps (schema version 9), not by counting the jobs.

        submitter: count only that submitter's jobs (the dashboard of a user who is not an admin).
        """

    def activity(since, submitter=None):
        """Fire with {"submitted": jobs submitted after since, and for each ended state: jobs that entered it after}."""

    def counts_by(column, since, submitter=None):
        """Fire with {value of column (None when unset): {status: count}}: the active jobs now, and the jobs that
        succeeded or failed after since.  column: destination_host or stager_hostname (ValueError otherwise)."""

    def failure_reasons(since, submitter=None, limit=1000):
        """Fire with up to limit (detailed_status, count, latest time_updated) of the jobs that failed after since,
        most frequent first."""

    def recent_failures(since, limit, submitter=None):
        """Fire with up to limit Jobs that failed after since, the latest first."""

    def recent_successes(destination_host, since, limit):
        """Fire with up to limit Jobs to destination_host submitted since then that succeeded, newest first."""

    def purge_ended(before, limit, archive=None):
        """Remove up to limit ended jobs last changed before `before`, with their history, in one short transaction.

        archive(jobs, events) runs first, in that transaction; fires with the number removed.
        """

    def purge_submissions(before, limit):
        """Remove up to limit submissions rows older than `before`; fire with how many."""

    def copies_freed(job_ids):
        """Record that the ended jobs' staged copies are gone (time_copy_freed; stager_path no longer shown); fire
        with how many were not recorded before."""

    def transition(job_id, old, new, fields=None, hold=None, actor=None):
        """Compare-and-set old -> new, setting time_<new> and fields, leaving the job under hold.

        Raises InvalidTransition for a move the state machine forbids.  Fires
        with True when the row changed, False when the job was not in old.
        A transition starts the count of deliveries afresh (one, when it
        leaves the job under a worker's lease) and ends an outage (time_away).
        """

    def transition_many(old, new, changes, actor=None):
        """transition() of many jobs old -> new in one transaction, each free afterwards.

        changes: {job_id: fields}, each job's own.  Fires with the set of
        ids that moved; a job not in old is left as it is.
        """

    def update(job_id, status, fields, note=None):
        """Set fields on a job still in status (the pipeline's re-staging); fire with True/False.

        note: (actor, reason) of an attempt, recorded in the history with the change.
        """

    def note(job_id, status, actor, reason):
        """Record an attempt in the history of a job still in status; fire with True/False."""

    def events(job_id):
        """Fire with the job's history, oldest first (dicts: kind, old_status, new_status, time, actor, reason)."""

    def record_stager_request(job_id, request_id):
        """Store the stager's own id for a STAGING job's request; fire with True if the job is still STAGING."""

    def record_transfer_id(job_id, status, fts_jobid):
        """Store the transfer service's id for a job still in status; fire with True/False."""

    def take_lease(job_id, statuses, owner, seconds):
        """Take the lease of a job in one of statuses that is free or in the queue.

        Fires with the Job as it now is, owned by owner for seconds, or None
        when the job is in another state or held by someone else.  A worker
        (any owner but leases.IN_QUEUE) taking the lease counts one delivery
        in the job's deliveries, which survives a crash of the daemon.
        """

    def claim(job_id, statuses, owner, seconds, start, fresh=("deliveries",)):
        """take_lease for a worker, and for a job in start's old state whose fresh columns are all 0 (no worker
        took it before) start's transition (old, new, fields, actor) in the same statement, leaving it leased.

        Fires with (the Job as it now is, or None; whether it moved).
        """

    def hold_in_queue(status, job_ids, seconds):
        """Put the jobs among job_ids still in status and not held by a worker under a queue hold.

        One statement for many jobs (their messages were just confirmed); fires with the count.
        """

    def renew_leases(owner, job_ids, seconds):
        """Extend the leases that owner holds on job_ids; fire with the count renewed."""

    def end_lease(job_id, owner, then=None):
        """End owner's lease on the job, leaving it free or under then (a wait); fire with True/False.

        A worker giving its lease back has not crashed: the delivery its
        take_lease counted is taken back, so deliveries counts only the
        workers that never came back.
        """

    def jobs_to_redrive(statuses, limit, include_queue_holds=False):
        """Fire with up to limit Jobs in statuses that are free, oldest first.

        include_queue_holds: also jobs under a queue hold (their messages
        died with an in-process queue).
        """

    def beat(daemon):
        """Record a heartbeat of daemon (a transferd.fleet.DaemonInfo: its row, last_beat now); fire with its
        drain flag as stored (an operator may have set it from another daemon)."""

    def set_drain(daemon_ids, drain):
        """Set the drain flag of these daemons; fire with how many rows exist among them."""

    def fleet(forget_before):
        """Fire with every daemon row (DaemonInfo with time_beat), after deleting those silent since before
        forget_before (epoch seconds): daemons long dead."""

    def leases_by_owner(statuses):
        """Fire with {lease_owner: how many jobs} of the jobs in statuses under a live worker's lease."""

    def forget_daemon(daemon_id):
        """Delete daemon_id's row (it stopped cleanly); fire with True/False."""

    def take_for_polling(status, owner, hold, limit, having=None, slots=None):
        """Take up to limit jobs in status for one polling cycle, least recently polled first.

        A poller's lease is separate from the workers' lease: a job taken here
        is polled by owner only, for hold(age) seconds from now (age: the
        seconds since it entered status; transferd.polling.Poller.hold), so
        several daemons polling at once each poll different jobs, and a job
        long in its state is asked about less often.  having names a column that
        must be set (e.g. fts_jobid); slots (first, end) the poll slots this
        daemon polls (transferd.fleet).  Fires with the Jobs taken.
        """

    def schedule(step, plan, fits, hold, daemon_id=None, hosts=False):
        """One scheduling pass (transferd.scheduler) in one transaction, one pass at a time fleet-wide.

        plan(Counts) -> ({share: jobs to release}, room per destination host
        or None); fits(room, host) -> whether one more job to host fits (taking its
        room); hosts: count per destination host too.  Each share's jobs are
        taken by priority, then age; those released are put under hold.  Fires
        with their ids.
        """

    def scheduling_counts(step, hosts=False):
        """The transferd.scheduler.Counts of step now (hosts: per destination host too)."""

    def fold_job_counts():
        """Fold the latest changes of the kept job counts in (up to fold_batch of them); fire with how many.

        The counts read (count_by_status, scheduling_counts) are right whether
        or not the changes are folded; folding keeps what they read small.
        """

    def ahead_in_share(job):
        """How many jobs free to release in job's state and share come before it."""

    def release_to_scheduler(statuses, limit, include_queue_holds=False):
        """Free jobs in statuses whose lease ran out (and, with include_queue_holds, those under a queue hold),
        so that the scheduler releases them again; fire with how many."""


class IJobQueue(IService):
    """Wake-up signals carrying job ids; the store stays the source of truth."""

    durable = Attribute(
        "True when published messages survive a restart of the daemon (a broker). False for an "
        "in-process queue: after a restart its queue holds are void and the reconciler re-drives them."
    )
    connected = Attribute(
        "True while publishing can succeed (a broker: while connected to it; in-process: always). /readyz and the"
        " transferd_broker_connected metric read it."
    )

    def publish(queue, job_id):
        """Fire once the message is durably accepted; fail if it could not be."""

    def publish_many(queue, job_ids):
        """Publish one message per job id, all at once; fire once all are accepted, fail if any was not."""

    def consume(queue, handler, prefetch, on_dead_letter):
        """Deliver each job id to handler(job_id) -> Deferred, at most prefetch at once.

        The message is acknowledged when handler's Deferred succeeds.  When it
        fails the message is delivered again, up to max_deliveries in all;
        then it is dead-lettered and on_dead_letter(queue, job_id, reason)
        -> Deferred is called.  A failure with StoreUnavailable (our own
        database is away) is delivered again without being counted.
        Consumers survive reconnections.
        """

    def stop_consuming():
        """Hand no more messages to the handlers: the daemon is stopping or drained.

        Messages not handled go back to the queue at once, for other daemons; those being handled finish.
        """

    def resume_consuming():
        """Hand messages to the handlers again, after stop_consuming (an operator undrained the daemon)."""


class IReconfigurable(Interface):
    """A part of the daemon that takes new settings while running (SIGHUP; transferd.wiring.Daemon.reload)."""

    def reconfigure(config):
        """Use the settings of config (a transferd.config.Config, checked as a whole) from now on.

        Check everything first: raise transferd.config.ConfigError to refuse,
        having changed nothing; otherwise apply it all at once.  Only the keys
        of transferd.config.RELOADABLE may differ from those the part was built with.
        """


class IOutcomes(Interface):
    """Where stagers, movers and their pollers report how a job's staging or transfer ended."""

    def staging_done(job, result, actor):
        """Record a StageResult for a STAGING job; fire with True when it was recorded.

        actor: who says so, for the job's history (e.g. "the tape system").
        """

    def stagings_done(outcomes, actor):
        """Record [(job, StageResult)] of STAGING jobs together; fire with the ids of those recorded."""

    def transfer_done(job, result, actor):
        """Record a TransferResult for a TRANSFERRING job; fire with True when it was recorded."""

    def transfers_done(outcomes, actor):
        """Record [(job, TransferResult)] of TRANSFERRING jobs together; fire with the ids of those recorded."""


class IStager(IService):
    """Brings a product from the archive (tape) to disk."""

    timeout = Attribute("seconds a staging attempt may take before it is tried again")
    max_attempts = Attribute(
        "staging attempts the stager accepted (and that then failed or timed out) before the job goes to ERROR; "
        "tries while the stager is away (ServiceAway) do not count"
    )
    give_up_after = Attribute("seconds the stager may stay away (ServiceAway) before a job waiting for it is failed")
    batch_size = Attribute(
        "how many stage() calls the stager can serve together (its bulk request size); 1 for one at a time"
    )

    def check(product_id):
        """Fire with True/False when the product's existence is known at once, else None."""

    def stage(job, authcode):
        """Start staging job's product.

        Fire with a StageResult when staging finished in-line, or with None
        when the outcome comes later (POST /doneStaging carrying authcode, or
        a poller).  May fail with ServiceAway.
        """

    def still_staging(job):
        """Fire with True when the stager is still working on the attempt whose authcode hash job holds.

        The pipeline asks before staging again a job a worker died on (its
        report may still come, and asking again would stage it twice); False
        when the stager does not have that attempt, or cannot tell.
        """

    def cancel(job):
        """Tell the stager to stop working on job (best effort)."""

    def free_copy(job):
        """The job has ended: its staged copy may be freed (best effort)."""

    def pollers(outcomes):
        """The services that follow this stager's requests and report to outcomes (IOutcomes); often none."""


class IMover(IService):
    """Moves a staged product to its destination."""

    schemes = Attribute("frozenset of destination URL schemes this mover can write")
    asynchronous = Attribute(
        "False: transfer() moves the bytes and fires with the outcome, the job TRANSFERRING meanwhile. "
        "True: transfer() submits (idempotently) while the job is still STAGED and fires with None once "
        "accepted, or a failed TransferResult; a poller reports the outcome."
    )
    timeout = Attribute("asynchronous movers: seconds a transfer may take; the job waits that long")
    give_up_after = Attribute(
        "seconds the transfer service may stay away (ServiceAway) before a job waiting for it ends in ERROR; "
        "None for a mover that is never away"
    )

    def transfer(job):
        """Move or submit job's staged product (see asynchronous); may fail with ServiceAway."""

    def cancel(job):
        """Stop the transfer of job (best effort)."""

    def pollers(outcomes):
        """The services that follow submitted transfers and report to outcomes (IOutcomes); often none."""
