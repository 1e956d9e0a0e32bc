"""Housekeeping: ended jobs removed after [retention] keep, and copies a crash left behind.

* Retention: jobs that ended (SUCCESS, ERROR, CANCELLED) and have not
  changed for `keep` seconds are removed with their history (job_events),
  and submissions rows older than that too, BATCH rows per transaction with
  a PAUSE between transactions, so that the tables are never locked for
  long.  With an archive file, each job (as the v1 API shows it, with its
  events) is first appended to it as one JSON line, in the transaction that
  removes it; the file is opened for every batch, so a rotated file is
  simply started afresh.  A batch whose commit fails is archived again by
  the next run: a job may then appear twice in the archive.
* Leftovers: the local stager's staging_root/<job_id>/ directories and the
  local mover's hidden partial deliveries (.NAME.transferd-<job_id>) whose
  job is not active any more are removed, one log line each.  The staging
  root is listed whole; partial deliveries are looked for in the file://
  destination directories of the jobs that ended since the previous sweep
  (at start-up: within LOOKBACK).

Both run at start-up and every [retention] interval on every daemon
(Housekeeping, a TimerService).  Several daemons may run them at once: on
MySQL each purge batch takes its rows FOR UPDATE SKIP LOCKED, and removing
what another daemon removed already is not an error.
"""

import json
import os
import re
from urllib.parse import unquote, urlsplit

from twisted.application.internet import TimerService
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from transferd import files, jobs
from transferd.interfaces import StoreUnavailable
from transferd.validation import under_roots

BATCH = 500  # rows per transaction
PAUSE = 0.2  # seconds between two transactions
LOOKBACK = 86400.0  # seconds: at start-up, partial deliveries are looked for among jobs that ended this recently
PAGE = 200  # jobs asked about at once
OVERLAP = 60.0  # seconds each sweep looks back before the previous one started (clocks of several daemons)


class Retention:
    """Removes ended jobs older than keep seconds (see the module's docstring)."""

    log = Logger()

    def __init__(self, store, clock, keep, archive=None, batch=BATCH, pause=PAUSE):
        self.store = store
        self.clock = clock
        self.keep = keep
        self.archive = archive
        self.batch = batch
        self.pause = pause
        self.stopping = False

    async def run_once(self):
        """One pass; fires with (jobs removed, submissions removed)."""
        before = jobs.utc_from_seconds(self.clock.seconds() - self.keep)
        removed = await self._in_batches(lambda: self.store.purge_ended(before, self.batch, self._archive))
        submissions = await self._in_batches(lambda: self.store.purge_submissions(before, self.batch))
        if removed or submissions:
            self.log.info("retention: removed {jobs} jobs that ended before {before} and {submissions} old"
                          " submissions", jobs=removed, before=before.isoformat(), submissions=submissions)
        return removed, submissions

    async def _in_batches(self, batch):
        total = 0
        while not self.stopping:
            count = await batch()
            total += count
            if count < self.batch:
                break
            if self.pause:
                await task.deferLater(self.clock, self.pause, lambda: None)
        return total

    def _archive(self, found, events):
        """Append one JSON line per job to the archive file, on disk before the rows go (runs in the DB thread)."""
        if self.archive is None:
            return
        history = {}
        for event in events:
            event = dict(event, time=event["time"].isoformat().replace("+00:00", "Z") if event["time"] else None)
            history.setdefault(event.pop("job_id"), []).append(event)
        lines = [json.dumps(dict(job.public_view(v1=True), events=history.get(job.job_id, [])), sort_keys=True)
                 for job in found]
        with open(self.archive, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class Leftovers:
    """Removes staged copies and partial deliveries whose job is not active (see the module's docstring).

    staging_root: the local stager's, or None; file_roots: the local mover's
    (empty: it is not in use).
    """

    log = Logger()

    def __init__(self, store, clock, staging_root=None, file_roots=(), lookback=LOOKBACK):
        self.store = store
        self.clock = clock
        self.staging_root = staging_root
        self.file_roots = tuple(file_roots)
        self._since = clock.seconds() - lookback

    async def run_once(self):
        """One sweep; fires with the paths removed."""
        removed = []
        if self.staging_root is not None:
            removed += await self._staged_copies()
        if self.file_roots:
            removed += await self._partial_deliveries()
        return removed

    async def _staged_copies(self):
        try:
            names = await threads.deferToThread(os.listdir, self.staging_root)
        except FileNotFoundError:
            return []
        candidates = [name for name in names if jobs.is_job_id(name)]
        removed = []
        for start in range(0, len(candidates), PAGE):
            chunk = candidates[start:start + PAGE]
            known = {job.job_id: job for job in
                     await self.store.list_jobs(jobs.JobFilter(job_ids=tuple(chunk)), len(chunk))}
            for job_id in chunk:
                job = known.get(job_id)
                if job is not None and not job.terminal:
                    continue
                path = os.path.join(self.staging_root, job_id)
                if await self._remove(path, job_id, job, "staged copy"):
                    removed.append(path)
                if job is not None:
                    await self.store.copies_freed([job_id])
        return removed

    async def _partial_deliveries(self):
        started = self.clock.seconds()
        since = jobs.utc_from_seconds(self._since)
        removed, after = [], None
        while True:
            page = await self.store.list_jobs(jobs.JobFilter(statuses=tuple(sorted(jobs.TERMINAL)),
                                                             updated_after=since), PAGE, after)
            for job in page:
                for path in await threads.deferToThread(self._partials_of, job):
                    if await self._remove(path, job.job_id, job, "partial delivery"):
                        removed.append(path)
            if len(page) < PAGE:
                break
            after = (page[-1].time_submitted, page[-1].job_id)
        self._since = started - OVERLAP
        return removed

    def _partials_of(self, job):
        """The partial deliveries the local mover may have left for an ended job (runs in a thread)."""
        try:
            parts = urlsplit(job.destination_path or "")
        except ValueError:
            return []
        if parts.scheme.lower() != "file":
            return []
        directory = unquote(parts.path)
        if not under_roots(directory, self.file_roots):
            return []
        pattern = re.compile(r"\..+\.transferd-" + re.escape(job.job_id) + r"\Z", re.DOTALL)
        try:
            names = os.listdir(directory)
        except OSError:
            return []
        return [os.path.join(directory, name) for name in names if pattern.match(name)]

    async def _remove(self, path, job_id, job, what):
        try:
            await threads.deferToThread(files.remove, path)
        except FileNotFoundError:
            return False  # someone else (another daemon, the job's own clean-up) was first
        except OSError as error:
            self.log.warn("could not remove the leftover {what} {path}: {error}", what=what, path=path,
                          error=error.strerror)
            return False
        state = f"ended {job.status}" if job is not None else "unknown"
        self.log.info("removed the leftover {what} {path} (job {job_id}: {state})", what=what, path=path,
                      job_id=job_id, state=state)
        return True


class Housekeeping(TimerService):
    """Retention and leftovers at start-up and every interval; a pass stops between batches when the daemon stops."""

    log = Logger()

    def __init__(self, interval, clock, retention=None, leftovers=None):
        super().__init__(interval, self.run_once)
        self.clock = clock
        self.retention = retention
        self.leftovers = leftovers

    async def _run(self):
        for part in (self.leftovers, self.retention):
            if part is None or not self.running:
                continue
            try:
                await part.run_once()
            except StoreUnavailable as error:  # an outage of the database: one line, nothing to debug here
                self.log.warn("housekeeping: {part} waits for the database ({error}); the next pass tries again",
                              part=type(part).__name__, error=error)
            except Exception:
                self.log.failure("housekeeping: {part} failed; the next pass tries again", part=type(part).__name__)

    def run_once(self):
        return defer.Deferred.fromCoroutine(self._run())

    def stopService(self):
        if self.retention is not None:
            self.retention.stopping = True
        return super().stopService()


def from_config(config, store, clock, stager, mover):
    """The Housekeeping service: [retention], and the leftovers of the local stager and the local mover, if in use."""
    from transferd.movers.local import LocalMover
    from transferd.stagers.local import LocalStager

    section = config.retention
    retention = None
    if section.keep:
        retention = Retention(store, clock, section.keep.total_seconds(), archive=section.archive or None)
    staging_root = stager.staging_root if isinstance(stager, LocalStager) else None
    file_roots = mover.file_roots if isinstance(mover, LocalMover) else ()
    return Housekeeping(section.interval, clock, retention, Leftovers(store, clock, staging_root, file_roots))
