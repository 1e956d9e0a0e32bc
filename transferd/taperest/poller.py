"""The Tape REST poller: follows the staging requests of STAGING jobs and reports how their files ended.

Every poll_interval (and once at start) it takes STAGING jobs that have a
``stager_request`` (store.take_for_polling: several daemons share the
polling, and a restarted daemon resumes from the stored request ids), sends
one ``GET <endpoint>/stage/<id>`` per request, finds each job's file in the
answer by path (the order of the list means nothing), and reports to its
outcomes (IOutcomes.staging_done): COMPLETED (or ``onDisk: true``) stages
the job, FAILED or CANCELLED fails it with the tape system's error, other
states wait.  A request the tape system no longer knows (404) fails its
jobs.  A job is taken for 0.8 poll_interval, so it is polled about once per
interval however many daemons poll.
"""

import collections
import uuid
from urllib.parse import quote, urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from transferd import jobs
from transferd.jobs import StagedFile, StageResult
from transferd.polling import Poller
from transferd.taperest.client import Refused, Unreachable, document, normalize, problem

POLL_HOLD = 0.8  # jobs are taken for this fraction of poll_interval
POLL_LIMIT = 1000  # jobs taken per polling cycle
POLL_CONCURRENCY = 8  # GET /stage/<id> in flight at once
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"


class TapeRestPoller(Poller):
    """Polls the staging requests of the STAGING jobs it can take, every poll_interval."""

    log = Logger()
    service = "Tape REST"

    def __init__(self, client, store, clock, outcomes, poll_interval=30.0, poll_limit=POLL_LIMIT,
                 poll_concurrency=POLL_CONCURRENCY, name=None):
        """name: this poller's name in the store (default: a fresh uuid)."""
        super().__init__(client, store, clock, outcomes, poll_interval)
        self.poll_limit = poll_limit
        self.poll_concurrency = poll_concurrency
        self.owner = name or f"taperest-{uuid.uuid4()}"

    async def cycle(self):
        taken = await self.store.take_for_polling(jobs.STAGING, self.owner, self.poll_interval * POLL_HOLD,
                                                  self.poll_limit, having="stager_request")
        requests = collections.defaultdict(list)
        for job in taken:
            requests[job.stager_request].append(job)
        limit = defer.DeferredSemaphore(self.poll_concurrency)
        await defer.gatherResults(
            [limit.run(lambda rid=rid, group=group: defer.Deferred.fromCoroutine(self._poll_request(rid, group)))
             for rid, group in requests.items()],
            consumeErrors=True,
        )

    async def _poll_request(self, request_id, group):
        """GET one staging request and report every job of it whose file has finished."""
        try:
            endpoint = await self.client.endpoint()
            answer = await self.client.call("GET", f"/stage/{quote(request_id, safe='')}")
        except (Unreachable, Refused) as error:
            self.log.warn("Tape REST request {request_id} not polled: {error}", request_id=request_id, error=error)
            return
        found = document(answer)
        if answer.code == 404:
            host = urlsplit(endpoint).hostname
            outcomes = [(job, StageResult(False, f"staging request lost by the tape system ({host} no longer "
                                                 f"knows request {request_id})")) for job in group]
        elif answer.code != 200 or not isinstance(found, dict):
            self.log.warn("Tape REST request {request_id} not polled: HTTP {code}: {why}",
                          request_id=request_id, code=answer.code, why=problem(answer))
            return
        else:
            files = {}
            for entry in found.get("files") or ():
                if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                    files[normalize(entry["path"])] = entry
            outcomes = []
            for job in group:
                path = self.client.path_for(job.product_id)
                outcome = self._outcome(endpoint, request_id, job, path, files.get(normalize(path)))
                if outcome is not None:
                    outcomes.append((job, outcome))
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._report(job, outcome)) for job, outcome in outcomes],
            consumeErrors=True,
        )

    @staticmethod
    def _outcome(endpoint, request_id, job, path, entry):
        """The StageResult a file's entry means, or None while it is still on its way."""
        if entry is None:
            return StageResult(False, f"the tape system's request {request_id} does not list {path}")
        state = str(entry.get("state") or "").upper()
        if entry.get("onDisk") is True or state == COMPLETED:
            return StageResult(
                success=True,
                msg=f"recalled from tape (Tape REST request {request_id})",
                staged_to=urlsplit(endpoint).hostname,
                path=path,
                files=(StagedFile(job.product_id),),
            )
        if state in (FAILED, CANCELLED):
            error = str(entry.get("error") or "").strip() or f"the file is {state}"
            return StageResult(False, f"tape recall of {path} {state.lower()}: {error}")
        return None

    async def _report(self, job, outcome):
        try:
            await self.outcomes.staging_done(job, outcome, actor="the tape system")
        except Exception:
            self.log.failure("job {job_id}: could not record the staging outcome; it will be polled again",
                             job_id=job.job_id)
