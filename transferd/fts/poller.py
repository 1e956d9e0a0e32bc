"""The FTS poller: follows the jobs FTS3 runs for us and reports how they ended.

Every poll_interval (and once at start) it takes batches of TRANSFERRING
jobs with an fts_jobid (store.take_for_polling: several daemons poll
different jobs; another batch while the last was full, Poller.more_due; a
long-running transfer less often, Poller.interval), asks FTS about them
bulk_size ids per request (fewer when the request path would be too long:
FTSClient.batches), and reports
every job FTS has finished to its outcomes (IOutcomes.transfers_done, a request's together):
FINISHED is SUCCESS; FAILED, FINISHEDDIRTY and CANCELED are ERROR with FTS's
reasons; a job FTS no longer knows is ERROR ("lost by FTS"); a job still
running after timeout is cancelled at FTS, then ERROR.  While FTS cannot be
asked (away, or our credentials refused) nothing is decided: a job is timed
out only on an answer FTS gave, so an outage never ends a job before its
transfer_timeout.
"""

import json
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from transferd import jobs
from transferd.fts.client import TERMINAL_STATES, FTSError, FTSRefused, FTSUnavailable
from transferd.jobs import TransferResult
from transferd.polling import Poller

ACTOR = "FTS"  # who ends a job's transfer, in its history

# fts_details is a TEXT column (64 KiB in MySQL): keep the JSON under this.
MAX_DETAILS_CHARS = 60000
FAILED_FILES_SHOWN = 3


class FTSPoller(Poller):
    """Polls FTS every poll_interval for the TRANSFERRING jobs it can take; poll_once fires with a summary."""

    log = Logger()
    service = "FTS"

    def __init__(self, client, store, clock, outcomes, poll_interval=30.0, bulk_size=100, timeout=86400.0,
                 poll_limit=None, max_poll_interval=None):
        super().__init__(client, store, clock, outcomes, poll_interval, max_poll_interval)
        self.bulk_size = bulk_size
        self.timeout = timeout
        self.poll_limit = poll_limit or max(1000, bulk_size * 10)
        self.owner = f"fts-poller-{uuid.uuid4()}"

    def nothing(self):
        return {"jobs": 0, "requests": 0, "reported": 0}

    def chunks(self, jobs_):
        """Groups of jobs polled by one request: at most bulk_size, and a request path of bounded length."""
        by_id = {job.fts_jobid: job for job in jobs_}
        for batch in self.client.batches(by_id, self.bulk_size):
            yield [by_id[fts_id] for fts_id in batch]

    async def cycle(self):
        summary = {"jobs": 0, "requests": 0, "reported": 0}
        started = self.clock.seconds()
        while True:
            taken = await self._poll_batch(summary)
            if not self.more_due(taken, started):
                break
        if summary["reported"]:
            self.log.info("FTS poll: {reported} of {jobs} job(s) ended", **summary)
        return summary

    async def _poll_batch(self, summary):
        """Take up to poll_limit jobs, ask FTS about them and settle those it has finished; how many were taken."""
        # Taken for just under their interval, so the cycle (here or elsewhere) one interval on takes them again.
        taken = await self.store.take_for_polling(
            jobs.TRANSFERRING, self.owner, self.hold, self.poll_limit, having="fts_jobid", slots=self.slots)
        summary["jobs"] += len(taken)
        for chunk in self.chunks(taken):
            summary["requests"] += 1
            try:
                answers = await self.client.status([job.fts_jobid for job in chunk])
            except FTSUnavailable as error:
                self.log.warn("cannot poll FTS for {n} job(s): {error}; will try again", n=len(chunk), error=error)
                return 0  # the other chunks would fail the same way, and so would another batch
            except FTSError as error:
                self.log.warn("FTS would not report on {n} job(s): {error}", n=len(chunk), error=error)
                continue
            summary["reported"] += await self._settle(chunk, answers)
        return len(taken)

    async def _settle(self, chunk, answers):
        """Report the chunk's jobs FTS has finished (or lost) together, follow the others; how many reported."""
        finished, running = [], []
        for job in chunk:
            result = self._ending(job, answers)
            (running if result is None else finished).append((job, result))
        reported = 0
        if finished:
            try:
                # One store transition for all the successes (and one for the failures): a few statements.
                await self.outcomes.transfers_done(finished, actor=ACTOR)
                reported = len(finished)
            except Exception:
                self.log.failure("could not record the outcomes of {n} FTS job(s); the next poll reports them",
                                 n=len(finished))
        followed = await defer.gatherResults([defer.Deferred.fromCoroutine(self._follow_safely(job, answers))
                                              for job, _ in running], consumeErrors=True)
        return reported + sum(followed)

    def _ending(self, job, answers):
        """The TransferResult of a job FTS has finished with (or no longer knows); None while it runs."""
        entry = answers.get(job.fts_jobid, False)
        if entry is None:
            return TransferResult(
                False, f"lost by FTS: {self.client.endpoint} no longer knows its job {job.fts_jobid}",
                _details(job.fts_jobid, self.client.endpoint, {"http_status": "404 Not Found"}))
        if isinstance(entry, dict) and entry.get("job_state") in TERMINAL_STATES:
            return _outcome(job, entry, self.client.endpoint)
        return None

    async def _follow_safely(self, job, answers):
        try:
            return bool(await self._follow(job, answers))
        except Exception:
            self.log.failure("job {job_id}: could not follow its FTS job {fts_jobid}",
                             job_id=job.job_id, fts_jobid=job.fts_jobid)
            return False

    async def _follow(self, job, answers):
        """A job FTS has not finished: time it out when overdue, else keep its progress; True when reported."""
        if job.fts_jobid not in answers:
            return False
        entry = answers[job.fts_jobid]
        if isinstance(entry, Exception):
            self.log.warn("job {job_id}: {error}", job_id=job.job_id, error=entry)
            return False
        if self._overdue(job):
            return await self._time_out(job)
        await self._record_progress(job, entry)
        return False

    async def _record_progress(self, job, entry):
        """Keep FTS's view of a running job in fts_details, where the v1 API reads its progress; written on change."""
        known = _progress(job.fts_details)
        if _entry_progress(entry) == known:
            return  # most polls of a running job: nothing new, and nothing to encode
        details = _details(job.fts_jobid, self.client.endpoint, entry)
        if _progress(details) != known:  # not only its files shortened to fit, as they were when stored
            await self.store.update(job.job_id, jobs.TRANSFERRING, {"fts_details": details})

    def _overdue(self, job):
        started = job.time_transferring
        return started is not None and started.timestamp() + self.timeout <= self.clock.seconds()

    async def _time_out(self, job):
        """Cancel the FTS job, then end ours in ERROR; wait for the next cycle if FTS cannot be told."""
        try:
            answer = await self.client.cancel(job.fts_jobid)
        except FTSUnavailable as error:
            self.log.warn("job {job_id}: transfer overdue, but FTS could not be told to cancel {fts_jobid} "
                          "({error}); will try again", job_id=job.job_id, fts_jobid=job.fts_jobid, error=error)
            return False
        except FTSRefused as error:
            answer = {"http_status": f"{error.code}", "http_message": error.message}
        if isinstance(answer, dict) and str(answer.get("http_status", "")).startswith("304"):
            return False  # it ended meanwhile: the next cycle reports how
        limit = self.timeout
        self.log.info("job {job_id}: transfer overdue after {limit:g}s; FTS job {fts_jobid} cancelled",
                      job_id=job.job_id, limit=limit, fts_jobid=job.fts_jobid)
        await self.outcomes.transfer_done(job, actor=ACTOR, result=TransferResult(
            False, f"transfer timed out after {limit:g}s; FTS job {job.fts_jobid} cancelled",
            _details(job.fts_jobid, self.client.endpoint, answer if isinstance(answer, dict) else {})))
        return True


def _details(fts_jobid, endpoint, entry):
    """JSON for fts_details: FTS's view of the job, shortened to fit the column."""
    detail = {"fts_jobid": fts_jobid, "endpoint": endpoint}
    if isinstance(entry, dict):
        detail.update(entry)
    files = list(detail.get("files") or [])
    text = json.dumps(detail, default=str)
    while len(text) > MAX_DETAILS_CHARS and files:
        files = files[: len(files) // 2]
        detail["files"] = files
        detail["files_omitted"] = len(entry.get("files") or []) - len(files)
        text = json.dumps(detail, default=str)
    return text[:MAX_DETAILS_CHARS]


def _progress(details):
    """(job state, file states) of fts_details text: what a progress report says; None when there is none."""
    try:
        return _entry_progress(json.loads(details))
    except (TypeError, ValueError, AttributeError):
        return None


def _entry_progress(entry):
    """(job state, file states) of FTS's answer about one job."""
    return entry.get("job_state"), tuple(f.get("file_state") for f in entry.get("files") or [] if isinstance(f, dict))


def _file_name(entry):
    metadata = entry.get("file_metadata")
    if isinstance(metadata, dict) and metadata.get("path"):
        return str(metadata["path"])
    return str(entry.get("dest_surl") or entry.get("file_id") or "a file")


def _outcome(job, entry, endpoint):
    """The TransferResult of a job FTS has finished with (state FINISHED, FAILED, FINISHEDDIRTY, CANCELED)."""
    state = entry.get("job_state")
    fts_jobid = entry.get("job_id") or job.fts_jobid
    files = [f for f in entry.get("files") or [] if isinstance(f, dict)]
    details = _details(fts_jobid, endpoint, entry)
    if state == "FINISHED":
        size = sum(int(f.get("filesize") or 0) for f in files)
        count = len(files) or len(job.files()) or 1
        return TransferResult(True, f"FTS delivered {count} file(s), {size} bytes to {job.destination_path} "
                                    f"(FTS job {fts_jobid})", details)
    msg = f"FTS job {fts_jobid} ended {state}"
    if entry.get("reason"):
        msg += f": {entry['reason']}"
    failed = [f for f in files if f.get("file_state") != "FINISHED"]
    if failed:
        shown = "; ".join(f"{_file_name(f)}: {f.get('file_state') or '?'}: {f.get('reason') or 'no reason given'}"
                          for f in failed[:FAILED_FILES_SHOWN])
        more = f"; and {len(failed) - FAILED_FILES_SHOWN} more" if len(failed) > FAILED_FILES_SHOWN else ""
        msg += f"; {len(failed)} of {len(files)} file(s) not delivered: {shown}{more}"
    return TransferResult(False, msg, details)
