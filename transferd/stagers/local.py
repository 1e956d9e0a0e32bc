"""The embedded stager: "tape" is a local directory, "recall" is a delayed copy.

It lets transferd run (and be tested end to end) without a real tape system:
a product is a file or directory named product_id directly under archive_root;
staging waits `delay` seconds on the clock (the simulated tape recall), then
copies the product to staging_root/<job_id>/<product_id> in a thread.  An
archive_root that is not there (an unmounted archive) is the archive being
away (ServiceAway), not the product missing.
"""

import os
import socket

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from transferd import files
from transferd.files import is_plain_name
from transferd.interfaces import IStager, ServiceAway
from transferd.jobs import StageResult


@implementer(IStager)
class LocalStager(Service):
    """Stages products from a local archive directory, in-line (stage() fires with the result)."""

    log = Logger()
    batch_size = 1

    def __init__(self, archive_root, staging_root, clock, delay=0.0, timeout=3600.0, max_attempts=3,
                 hostname=None, retry_delay=2.0, give_up_after=86400.0):
        self.archive_root = archive_root
        self.staging_root = staging_root
        self.clock = clock
        self.delay = delay
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay  # the retry_after of a ServiceAway (the archive root is missing)
        self.give_up_after = give_up_after
        self.hostname = hostname or socket.getfqdn()
        self._recalls = {}  # job_id -> {recall Deferred still waiting: why it was cancelled}

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """Fire with whether the product is in the archive (one stat: we know at once); None while it is away."""
        if not os.path.isdir(self.archive_root):
            return defer.succeed(None)
        return defer.succeed(is_plain_name(product_id) and os.path.exists(self._source(product_id)))

    def stage(self, job, authcode):
        """Wait out the simulated recall, then copy the product; fire with a StageResult.

        Permanent problems (no such product) fire a failed StageResult;
        anything unexpected (disk full, I/O error) fails the Deferred so that
        the pipeline retries through its queue.  Cancelling the Deferred
        during the recall stops it at once.
        """
        if not is_plain_name(job.product_id):
            return defer.succeed(StageResult(
                success=False, msg=f"product id {job.product_id!r} is not a plain name"))
        if not is_plain_name(job.job_id):
            return defer.succeed(StageResult(success=False, msg=f"job id {job.job_id!r} is not a plain name"))
        recall = task.deferLater(self.clock, self.delay, lambda: None)
        self._recalls.setdefault(job.job_id, {})[recall] = None
        recall.addBoth(self._recalled, job, recall)
        return recall

    def still_staging(self, job):
        """Staging runs in this process: an attempt whose worker died died with it."""
        return defer.succeed(False)

    def cancel(self, job):
        """Stop a recall still waiting (its stage() fires a failed result) and drop the copy."""
        for recall in list(self._recalls.get(job.job_id, ())):
            self._recalls[job.job_id][recall] = "cancelled"
            recall.cancel()
        return self._remove_job_dir(job)

    def free_copy(self, job):
        """The job has ended: free its staged copy."""
        return self._remove_job_dir(job)

    def pollers(self, outcomes):
        return []

    def stopService(self):
        """Cancel the recalls still waiting: their stage() Deferreds fail with CancelledError."""
        super().stopService()
        for recall in [d for pending in self._recalls.values() for d in pending]:
            recall.cancel()

    # -- internals --------------------------------------------------------

    def _source(self, product_id):
        return os.path.join(self.archive_root, product_id)

    def _recalled(self, result, job, recall):
        """The recall delay is over (or was cancelled): copy, or report the cancellation."""
        pending = self._recalls.get(job.job_id, {})
        why = pending.pop(recall, None)
        if not pending:
            self._recalls.pop(job.job_id, None)
        if isinstance(result, Failure):
            if why == "cancelled" and result.check(defer.CancelledError):
                return StageResult(success=False, msg=f"staging of {job.product_id!r} was cancelled")
            return result
        return threads.deferToThread(self._stage_now, job).addCallback(self._staged, job)

    def _staged(self, result, job):
        if result.success:
            # Debug: the operator's line is the job's STAGING -> STAGED; the path is in its status.
            self.log.debug("job {job_id}: staged {product_id} to {path}: {msg}",
                          job_id=job.job_id, product_id=job.product_id, path=result.path, msg=result.msg)
        return result

    def _stage_now(self, job):
        """Copy the product into the staging area (runs in a thread)."""
        product_id = job.product_id
        source = self._source(product_id)
        missing = StageResult(success=False, msg=f"product {product_id!r} is not in the archive")
        if not os.path.exists(source):
            if not os.path.isdir(self.archive_root):  # an unmounted archive: try again later
                raise ServiceAway(f"the archive root {self.archive_root} is not a directory (is the archive"
                                  f" mounted?)", self.retry_delay)
            return missing
        job_dir = os.path.join(self.staging_root, job.job_id)
        try:
            staged = files.stage_copy(source, job_dir, product_id)
        except FileNotFoundError:
            if not os.path.exists(source):  # removed from the archive while we copied
                return missing
            raise
        total = sum(f.size for f in staged)
        return StageResult(
            success=True,
            msg=f"staged {len(staged)} file(s), {total} bytes",
            staged_to=self.hostname,
            path=os.path.abspath(os.path.join(job_dir, product_id)),
            files=tuple(staged),
        )

    def _remove_job_dir(self, job):
        if not is_plain_name(job.job_id):
            return defer.succeed(None)
        job_dir = os.path.join(self.staging_root, job.job_id)
        d = threads.deferToThread(files.remove, job_dir)
        d.addErrback(lambda failure: self.log.failure("job {job_id}: removing {path}", failure,
                                                      job_id=job.job_id, path=job_dir))
        return d


def from_config(config, reactor, clock, store, metrics=None):
    """The local stager from [stager] (transferd.config has checked archive_root); staging_root is created."""
    section = config.stager
    os.makedirs(section.staging_root, exist_ok=True)
    return LocalStager(
        archive_root=os.path.abspath(section.archive_root),
        staging_root=os.path.abspath(section.staging_root),
        clock=clock,
        delay=section.delay,
        timeout=section.timeout,
        max_attempts=section.max_attempts,
        retry_delay=section.retry_delay,
        give_up_after=section.give_up_after,
    )
