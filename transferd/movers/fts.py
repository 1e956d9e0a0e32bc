"""The production mover: CERN FTS3 moves the staged files; a poller follows its jobs.

Submission (transfer(job), called while the job is STAGED) is idempotent.
Every submission uses FTS's deterministic job ids (``id_generator:
deterministic``, ``sid`` = our job id), so the FTS job id is known before the
POST: it is stored in ``fts_jobid`` first, then the job is POSTed.  A daemon
that dies in between submits again after a restart and gets 409 ("already
there"), which counts as accepted: FTS never holds two jobs for one of ours.

A product is one FTS job with one file entry per staged file: the source URL
comes from ``[fts] source_template`` and the staging result, the destination
is the job's destination_path joined with the file's path (which starts with
the product's name), and the size and checksum go along when the stager
reported them.

The poller (services(pipeline)) claims a batch of TRANSFERRING jobs every
poll_interval (claim_batch: several daemons poll different jobs), asks FTS
about them bulk_size ids per request, and reports every job FTS has finished
through pipeline.transfer_done: FINISHED is SUCCESS; FAILED, FINISHEDDIRTY and
CANCELED are ERROR with FTS's reasons; a job FTS no longer knows is ERROR
("lost by FTS"); a job still running after transfer_timeout is cancelled at
FTS, then ERROR.
"""

import json
import posixpath
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from transferd import jobs
from transferd.fts.client import (
    TERMINAL_STATES,
    FTSClient,
    FTSConflict,
    FTSError,
    FTSRefused,
    FTSUnavailable,
    deterministic_job_id,
)
from transferd.interfaces import IMover
from transferd.jobs import StagedFile, TransferResult

# Characters kept as they are in URL paths built from file paths.
PATH_SAFE = "/+=@,:~!$&'()*;"
# A poll request's ids stay under this many characters (Apache's request line
# limit is 8190 bytes), whatever bulk_size says.
MAX_IDS_CHARS = 7000
# fts_details is a TEXT column (64 KiB in MySQL): keep the JSON under this.
MAX_DETAILS_CHARS = 60000
FAILED_FILES_SHOWN = 3


def _safe_relative(path, name):
    """True when a recorded file path stays inside the product: name or name/..., no '..'."""
    parts = path.split("/")
    return parts[0] == name and all(part not in ("", ".", "..") for part in parts)


def _join_url(base, relative):
    """base URL + "/" + the relative path (percent-encoded), keeping base's query."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + "/" + quote(relative, safe=PATH_SAFE)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


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


@implementer(IMover)
class FTSMover:
    """Submits staged products to FTS3 (idempotently); its poller reports how they ended."""

    log = Logger()
    schemes = frozenset({"gsiftp", "davs", "https", "http", "root", "srm", "s3"})
    asynchronous = True

    def __init__(self, client, store, clock, source_template="gsiftp://{staged_to}{path}", poll_interval=30.0,
                 bulk_size=100, transfer_timeout=86400.0, verify_checksum="both", overwrite=False, retry=0,
                 priority=3, poll_limit=None):
        self.client = client
        self.store = store
        self.clock = clock
        self.source_template = source_template
        self.poll_interval = poll_interval
        self.bulk_size = bulk_size
        self.timeout = transfer_timeout
        self.verify_checksum = verify_checksum
        self.overwrite = overwrite
        self.retry = retry
        self.priority = priority
        self.poll_limit = poll_limit or max(1000, bulk_size * 10)

    # -- IMover -----------------------------------------------------------

    def transfer(self, job):
        """Submit job to FTS: None once FTS has it, a failed TransferResult when FTS refuses it.

        FTSUnavailable (FTS down, 5xx, credentials to fix) fails the Deferred:
        the job stays STAGED and the pipeline tries again.
        """
        return defer.Deferred.fromCoroutine(self._transfer(job))

    def cancel(self, job):
        """DELETE the job's FTS job, if it has one."""
        if not job.fts_jobid:
            return defer.succeed(None)
        d = defer.Deferred.fromCoroutine(self.client.cancel(job.fts_jobid))
        return d.addCallback(lambda answer: self.log.info(
            "job {job_id}: asked FTS to cancel {fts_jobid}", job_id=job.job_id, fts_jobid=job.fts_jobid))

    def close(self):
        return self.client.close()

    def services(self, pipeline):
        """The poller: a TimerService every poll_interval."""
        poller = FTSPoller(self, pipeline)
        timer = TimerService(self.poll_interval, poller.poll_once)
        timer.clock = self.clock
        timer.poller = poller
        return [timer]

    # -- submission -------------------------------------------------------

    def submission(self, job):
        """The FTS job for this staged product: the POST /jobs body, or a failed TransferResult."""
        if not job.stager_path:
            return TransferResult(False, f"job {job.job_id} has no staged copy to deliver")
        staged = job.stager_path.rstrip("/")
        name = posixpath.basename(staged)
        parent = posixpath.dirname(staged).rstrip("/")
        files = job.files() or (StagedFile(name),)
        outside = [f.path for f in files if not _safe_relative(f.path, name)]
        if outside:
            return TransferResult(False, f"the staged file list of job {job.job_id} names files outside the "
                                         f"product {name!r}: {outside[:3]}")
        entries = []
        for staged_file in files:
            try:
                source = self.source_template.format(
                    staged_to=job.stager_hostname or "",
                    path=quote(parent + "/" + staged_file.path, safe=PATH_SAFE),
                )
            except (KeyError, IndexError, ValueError) as error:
                return TransferResult(False, f"[fts] source_template {self.source_template!r} cannot be "
                                             f"filled in: {error}")
            entry = {
                "sources": [source],
                "destinations": [_join_url(job.destination_path, staged_file.path)],
                "metadata": {"transferd_job_id": job.job_id, "path": staged_file.path},
            }
            if staged_file.size is not None:
                entry["filesize"] = staged_file.size
            if staged_file.checksum:
                entry["checksum"] = staged_file.checksum
            entries.append(entry)
        params = {
            "id_generator": "deterministic",
            "sid": job.job_id,
            "job_metadata": {"transferd_job_id": job.job_id, "product_id": job.product_id},
            "verify_checksum": self.verify_checksum,
            "overwrite": self.overwrite,
            "retry": self.retry,
            "priority": self.priority,
        }
        return {"files": entries, "params": params}

    async def _transfer(self, job):
        if job.status == jobs.TRANSFERRING and job.fts_jobid:
            # FTS accepted it before (that is how it got here): the poller follows it; never POST again.
            self.log.info("job {job_id} is with FTS as {fts_jobid}; the poller follows it",
                          job_id=job.job_id, fts_jobid=job.fts_jobid)
            return None
        body = self.submission(job)
        if isinstance(body, TransferResult):
            return body
        try:
            return await self._submit(job, body)
        except FTSUnavailable as error:
            error.retry_later = self.poll_interval
            raise

    async def _submit(self, job, body):
        fts_jobid = deterministic_job_id(await self.client.vo(), job.job_id)
        if job.fts_jobid != fts_jobid:
            # Recorded before the POST: whatever happens next, we know FTS's id for it.
            if not await self.store.update(job.job_id, job.status, {"fts_jobid": fts_jobid}):
                self.log.info("job {job_id} is no longer {status}: not submitted to FTS",
                              job_id=job.job_id, status=job.status)
                return None
        try:
            returned = await self.client.submit(body)
        except FTSConflict:
            self.log.info("job {job_id}: FTS already has its job {fts_jobid}; not submitted again",
                          job_id=job.job_id, fts_jobid=fts_jobid)
            await self._stop_if_cancelled(job, fts_jobid)
            return None
        except FTSRefused as refusal:
            return TransferResult(
                False, f"FTS refused the transfer (HTTP {refusal.code}): {refusal.message}",
                json.dumps({"fts_jobid": fts_jobid, "endpoint": self.client.endpoint,
                            "http_status": refusal.code, "message": refusal.message}),
            )
        if returned != fts_jobid:
            self.log.warn(
                "job {job_id}: FTS named its job {returned}, not {predicted} as predicted; check [fts] vo",
                job_id=job.job_id, returned=returned, predicted=fts_jobid)
            await self.store.update(job.job_id, job.status, {"fts_jobid": returned})
        self.log.info("job {job_id}: submitted to FTS as {fts_jobid}, {files} file(s)",
                      job_id=job.job_id, fts_jobid=returned, files=len(body["files"]))
        await self._stop_if_cancelled(job, returned)
        return None

    async def _stop_if_cancelled(self, job, fts_jobid):
        """The user cancelled the job while it was being submitted: cancel what FTS just accepted."""
        current = await self.store.get(job.job_id)
        if current is not None and current.status == jobs.CANCELLED:
            self.log.info("job {job_id} was cancelled while being submitted; cancelling FTS job {fts_jobid}",
                          job_id=job.job_id, fts_jobid=fts_jobid)
            try:
                await self.client.cancel(fts_jobid)
            except FTSError as error:
                self.log.warn("job {job_id}: could not cancel FTS job {fts_jobid}: {error}",
                              job_id=job.job_id, fts_jobid=fts_jobid, error=error)


class FTSPoller:
    """One polling cycle at a time: claim TRANSFERRING jobs, ask FTS in bulk, report the ended ones."""

    log = Logger()

    def __init__(self, mover, pipeline):
        self.mover = mover
        self.client = mover.client
        self.pipeline = pipeline
        self.store = mover.store
        self.clock = mover.clock
        self.owner = f"fts-poller-{uuid.uuid4()}"

    def poll_once(self):
        """One cycle; fires with {"jobs", "requests", "reported"}.  Never fails (timer-safe)."""
        return defer.Deferred.fromCoroutine(self._poll_safely())

    async def _poll_safely(self):
        try:
            return await self._poll()
        except Exception:
            self.log.failure("FTS polling cycle failed; will try again")
            return {"jobs": 0, "requests": 0, "reported": 0}

    def chunks(self, jobs_):
        """Groups of jobs polled by one request: at most bulk_size, and a URL of bounded length."""
        chunk, chars = [], 0
        for job in jobs_:
            if chunk and (len(chunk) >= self.mover.bulk_size or chars + len(job.fts_jobid) + 1 > MAX_IDS_CHARS):
                yield chunk
                chunk, chars = [], 0
            chunk.append(job)
            chars += len(job.fts_jobid) + 1
        if chunk:
            yield chunk

    async def _poll(self):
        # A poller's claim lasts just under one interval, so the next cycle (here or elsewhere) can take it.
        claimed = await self.store.claim_batch(
            jobs.TRANSFERRING, self.owner, self.mover.poll_interval * 0.9, self.mover.poll_limit, having="fts_jobid")
        summary = {"jobs": len(claimed), "requests": 0, "reported": 0}
        for chunk in self.chunks(claimed):
            summary["requests"] += 1
            try:
                answers = await self.client.status([job.fts_jobid for job in chunk])
            except FTSUnavailable as error:
                self.log.warn("cannot poll FTS for {n} job(s): {error}; will try again", n=len(chunk), error=error)
                break  # the other chunks would fail the same way
            except FTSError as error:
                self.log.warn("FTS would not report on {n} job(s): {error}", n=len(chunk), error=error)
                continue
            for job in chunk:
                try:
                    summary["reported"] += bool(await self._settle(job, answers))
                except Exception:
                    self.log.failure("job {job_id}: could not settle its FTS job {fts_jobid}",
                                     job_id=job.job_id, fts_jobid=job.fts_jobid)
        if summary["reported"]:
            self.log.info("FTS poll: {reported} of {jobs} job(s) ended", **summary)
        return summary

    async def _settle(self, job, answers):
        """Report job if FTS has finished with it (or lost it, or it is overdue); True when reported."""
        if job.fts_jobid not in answers:
            return False
        entry = answers[job.fts_jobid]
        if entry is None:
            await self.pipeline.transfer_done(job, TransferResult(
                False, f"lost by FTS: {self.client.endpoint} no longer knows its job {job.fts_jobid}",
                _details(job.fts_jobid, self.client.endpoint, {"http_status": "404 Not Found"})))
            return True
        if isinstance(entry, Exception):
            self.log.warn("job {job_id}: {error}", job_id=job.job_id, error=entry)
            return False
        state = entry.get("job_state")
        if state in TERMINAL_STATES:
            await self.pipeline.transfer_done(job, _outcome(job, entry, self.client.endpoint))
            return True
        if self._overdue(job):
            return await self._time_out(job)
        return False

    def _overdue(self, job):
        started = job.time_transferring
        return started is not None and started.timestamp() + self.mover.timeout <= self.clock.seconds()

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
        limit = self.mover.timeout
        self.log.info("job {job_id}: transfer overdue after {limit:g}s; FTS job {fts_jobid} cancelled",
                      job_id=job.job_id, limit=limit, fts_jobid=job.fts_jobid)
        await self.pipeline.transfer_done(job, TransferResult(
            False, f"transfer timed out after {limit:g}s; FTS job {job.fts_jobid} cancelled",
            _details(job.fts_jobid, self.client.endpoint, answer if isinstance(answer, dict) else {})))
        return True


def from_config(config, clock, store):
    """The FTS mover from [fts]; configuration mistakes stop start-up with a message naming the key."""
    import os

    from transferd.config import ConfigError

    section = config.fts
    if not section.endpoint:
        raise ConfigError("[transfer] backend = fts needs [fts] endpoint (e.g. https://fts3.example.org:8446)")
    if section.auth == "token" and not section.token_file:
        raise ConfigError("[fts] auth = token needs [fts] token_file")
    if section.auth == "x509":
        if not (section.proxy or section.cert):
            raise ConfigError("[fts] auth = x509 needs [fts] proxy, or cert and key")
        if not section.endpoint.startswith("https://"):
            raise ConfigError("[fts] auth = x509 needs an https:// [fts] endpoint")
    for key in ("cert", "key", "proxy", "ca_path"):
        path = getattr(section, key)
        if path and not os.path.exists(path):
            raise ConfigError(f"[fts] {key} = {path!r} does not exist")
    try:
        section.source_template.format(staged_to="host.example.org", path="/staged/product")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"bad value for [fts] source_template = {section.source_template!r}: "
                          f"use {{staged_to}} and {{path}} only ({error})") from None
    try:
        client = FTSClient(
            section.endpoint, clock=clock, reactor=clock, auth=section.auth,
            token_file=section.token_file, cert=section.cert, key=section.key, proxy=section.proxy,
            ca_path=section.ca_path, vo=section.vo,
            delegation_min_lifetime=section.delegation_min_lifetime,
        )
    except ValueError as error:
        raise ConfigError(f"[fts]: {error}") from None
    return FTSMover(
        client, store, clock,
        source_template=section.source_template,
        poll_interval=section.poll_interval,
        bulk_size=section.bulk_size,
        transfer_timeout=section.transfer_timeout,
        verify_checksum=section.verify_checksum,
        overwrite=section.overwrite,
        retry=section.retry,
        priority=int(section.priority),
    )
