"""The Tape REST poller: follows the staging requests of STAGING jobs and reports how their files ended.

Every poll_interval (and once at start) it takes STAGING jobs that have a
``stager_request`` (store.take_for_polling: several daemons share the
polling, and a restarted daemon resumes from the stored request ids), sends
one ``GET <endpoint>/stage/<id>`` per request, finds each job's files in the
answer by path (the product's path and everything under it; the order of the
list means nothing), and reports to its outcomes (IOutcomes.stagings_done, a request's jobs together):
the job is staged once all its files are COMPLETED (or ``onDisk: true``),
fails as soon as one is FAILED or CANCELLED (with the tape system's error;
its other files are cancelled), and waits otherwise.  A request the tape
system no longer knows (404 with a problem document) fails its jobs.  An
endpoint that cannot be reached or answers anything else decides nothing:
the jobs wait, and the stager's timeout is their only limit.  A job is taken
for 0.8 of its interval, so it is polled about once per interval however many
daemons poll; a recall long under way less often (Poller.interval).
"""

import collections
import uuid
from urllib.parse import quote, urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from transferd import jobs
from transferd.jobs import StagedFile, StageResult
from transferd.polling import Poller
from transferd.taperest.client import Refused, Unreachable, document, problem

POLL_HOLD = 0.8  # jobs are taken for this fraction of their interval (Poller.hold)
POLL_LIMIT = 1000  # jobs taken per batch (a cycle takes batches while they come full: Poller.more_due)
POLL_CONCURRENCY = 8  # GET /stage/<id> in flight at once
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"
FAILED_SHOWN = 3  # failed files named in a job's error


def _state(entry):
    """A file entry's state; a file on disk is COMPLETED whatever else it says."""
    return COMPLETED if entry.get("onDisk") is True else str(entry.get("state") or "").upper()


def _error(entry, state):
    return str(entry.get("error") or "").strip() or f"the file is {state}"


class TapeRestPoller(Poller):
    """Polls the staging requests of the STAGING jobs it can take, every poll_interval."""

    log = Logger()
    service = "Tape REST"

    hold_share = POLL_HOLD

    def __init__(self, client, store, clock, outcomes, poll_interval=30.0, poll_limit=POLL_LIMIT,
                 poll_concurrency=POLL_CONCURRENCY, name=None, namespace=None, max_poll_interval=None):
        """name: this poller's name in the store (default: a fresh uuid).
        namespace: the Namespace mount that tells the staged files' sizes (None: sizes unknown).
        """
        super().__init__(client, store, clock, outcomes, poll_interval, max_poll_interval)
        self.namespace = namespace
        self.poll_limit = poll_limit
        self.poll_concurrency = poll_concurrency
        self.owner = name or f"taperest-{uuid.uuid4()}"

    async def cycle(self):
        started = self.clock.seconds()
        while True:
            taken = await self._poll_batch()
            if not self.more_due(taken, started):
                return

    async def _poll_batch(self):
        """Take up to poll_limit jobs and poll their requests; how many jobs were taken."""
        taken = await self.store.take_for_polling(jobs.STAGING, self.owner, self.hold, self.poll_limit,
                                                  having="stager_request", slots=self.slots)
        requests = collections.defaultdict(list)
        for job in taken:
            requests[job.stager_request].append(job)
        limit = defer.DeferredSemaphore(self.poll_concurrency)
        polled = await defer.gatherResults(
            [limit.run(lambda rid=rid, group=group: defer.Deferred.fromCoroutine(self._poll_request(rid, group)))
             for rid, group in requests.items()],
            consumeErrors=True,
        )
        return len(taken) if all(polled) else 0  # a request not polled: the next would fare no better

    async def _poll_request(self, request_id, group):
        """GET one staging request and report every job of it whose files have all ended, or one failed.

        False when the request could not be polled.
        """
        try:
            endpoint = await self.client.endpoint()
            answer = await self.client.call("GET", f"/stage/{quote(request_id, safe='')}")
        except (Unreachable, Refused) as error:
            self.log.warn("Tape REST request {request_id} not polled: {error}", request_id=request_id, error=error)
            return False
        found = document(answer)
        if answer.code == 404 and found is not None:
            host = urlsplit(endpoint).hostname
            outcomes = [(job, StageResult(False, f"staging request lost by the tape system ({host} no longer "
                                                 f"knows request {request_id})")) for job in group]
        elif answer.code != 200 or not isinstance(found, dict):
            self.log.warn("Tape REST request {request_id} not polled: HTTP {code}: {why}",
                          request_id=request_id, code=answer.code, why=problem(answer))
            return False
        else:
            outcomes = []
            for job in group:
                outcome = await self._outcome(endpoint, request_id, job, self.client.product_files(found, job.product_id))
                if outcome is not None:
                    outcomes.append((job, outcome))
        if outcomes:
            try:
                # The request's jobs together: one store transition for its recalled files' jobs.
                await self.outcomes.stagings_done(outcomes, actor="the tape system")
            except Exception:
                self.log.failure("Tape REST request {request_id}: could not record the staging outcomes of {n} job(s);"
                                 " they will be polled again", request_id=request_id, n=len(outcomes))
        return True

    async def _outcome(self, endpoint, request_id, job, files):
        """The StageResult the job's file entries ({path: entry}) mean, or None while some are on their way."""
        product = self.client.path_for(job.product_id)
        if not files:
            return StageResult(False, f"the tape system's request {request_id} does not list {product}")
        states = {path: _state(entry) for path, entry in files.items()}
        failed = sorted(path for path, state in states.items() if state in (FAILED, CANCELLED))
        if failed:
            pending = sorted(path for path, state in states.items() if state not in (COMPLETED, FAILED, CANCELLED))
            if pending:
                await self.client.post_paths("cancel", f"/stage/{quote(request_id, safe='')}/cancel", pending,
                                             job.job_id)
            reasons = "; ".join(f"{path} {states[path].lower()}: {_error(files[path], states[path])}"
                                for path in failed[:FAILED_SHOWN])
            more = f"; and {len(failed) - FAILED_SHOWN} more" if len(failed) > FAILED_SHOWN else ""
            if len(files) == 1:
                return StageResult(False, f"tape recall of {reasons}")
            return StageResult(False, f"tape recall of {len(failed)} of {len(files)} file(s) of {product} "
                                      f"failed: {reasons}{more}")
        if any(state != COMPLETED for state in states.values()):
            return None
        relatives = sorted(self.client.relative(path) for path in files)
        sizes = await self.namespace.sizes(relatives) if self.namespace is not None else {}
        return StageResult(
            success=True,
            msg=f"recalled {len(relatives)} file(s) from tape (Tape REST request {request_id})",
            staged_to=urlsplit(endpoint).hostname,
            path=product,
            files=tuple(StagedFile(relative, sizes.get(relative)) for relative in relatives),
        )
