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

FTS being away (FTSUnavailable: no connection, 5xx, credentials to fix, a
configured VO FTS disagrees with) is a ServiceAway: the job stays STAGED and
is tried again after poll_interval; the pipeline gives up on it only after
give_up_after seconds of FTS being away.  When FTS's VO for us has changed
since a job's id was recorded (a renewed credential), the recorded id is
asked about before anything is POSTed, so a job FTS has is never submitted
twice.  At start the mover asks FTS for our VO once, so that a wrong
``[fts] vo`` shows in the log at once.  The poller (pollers(outcomes),
transferd.fts.poller) follows the jobs FTS runs and reports how they ended.
"""

import json
import posixpath
from urllib.parse import quote, urlsplit, urlunsplit

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from transferd import jobs
from transferd.files import safe_relative
from transferd.fts.client import FTSClient, FTSConflict, FTSError, FTSRefused, FTSUnavailable, deterministic_job_id
from transferd.fts.poller import FTSPoller
from transferd.interfaces import IMover, IReconfigurable, ServiceAway
from transferd.jobs import StagedFile, TransferResult

# Characters kept as they are in URL paths built from file paths.
PATH_SAFE = "/+=@,:~!$&'()*;"


def _join_url(base, relative):
    """base URL + "/" + the relative path (percent-encoded), keeping base's query."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + "/" + quote(relative, safe=PATH_SAFE)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@implementer(IMover, IReconfigurable)
class FTSMover(Service):
    """Submits staged products to FTS3 (idempotently); its poller reports how they ended."""

    log = Logger()
    schemes = frozenset({"gsiftp", "davs", "https", "http", "root", "srm", "s3"})
    asynchronous = True

    def __init__(self, client, store, clock, source_template="gsiftp://{staged_to}{path}", poll_interval=30.0,
                 bulk_size=100, transfer_timeout=86400.0, verify_checksum="both", overwrite=False, retry=0,
                 priority=3, poll_limit=None, give_up_after=86400.0, max_poll_interval=300.0):
        self.client = client
        self.store = store
        self.clock = clock
        self.source_template = source_template
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval  # a long-running transfer's (transferd.polling)
        self.bulk_size = bulk_size
        self.timeout = transfer_timeout
        self.give_up_after = give_up_after  # seconds of FTS being away before the pipeline gives a job up
        self._first_contact = None
        self.verify_checksum = verify_checksum
        self.overwrite = overwrite
        self.retry = retry
        self.priority = priority
        self.poll_limit = poll_limit or max(1000, bulk_size * 10)

    def reconfigure(self, config):
        """New [fts] token_file, or cert, key and proxy (SIGHUP): FTS sees them from the next request on."""
        section = config.fts
        self.client.reconfigure_credentials(section.token_file, section.cert, section.key, section.proxy)

    # -- IMover -----------------------------------------------------------

    def transfer(self, job):
        """Submit job to FTS: None once FTS has it, a failed TransferResult when FTS refuses it.

        FTS being away (down, 5xx, credentials to fix) fails the Deferred with
        ServiceAway: the job stays STAGED and the pipeline tries again.
        """
        return defer.Deferred.fromCoroutine(self._transfer(job))

    def cancel(self, job):
        """DELETE the job's FTS job, if it has one."""
        if not job.fts_jobid:
            return defer.succeed(None)
        d = defer.Deferred.fromCoroutine(self.client.cancel(job.fts_jobid))
        return d.addCallback(lambda answer: self.log.info(
            "job {job_id}: asked FTS to cancel {fts_jobid}", job_id=job.job_id, fts_jobid=job.fts_jobid))

    def pollers(self, outcomes):
        """The poller, reporting to outcomes every poll_interval."""
        return [FTSPoller(self.client, self.store, self.clock, outcomes, poll_interval=self.poll_interval,
                          bulk_size=self.bulk_size, timeout=self.timeout, poll_limit=self.poll_limit,
                          max_poll_interval=self.max_poll_interval)]

    def startService(self):
        super().startService()
        self._first_contact = defer.Deferred.fromCoroutine(self._learn_vo())

    async def _learn_vo(self):
        try:
            await self.client.vo()
        except FTSError as error:
            self.log.warn("FTS {endpoint} could not tell our VO at start-up ({error}); it is asked again "
                          "before the first submission", endpoint=self.client.endpoint, error=error)
        except defer.CancelledError:
            pass

    def stopService(self):
        super().stopService()
        if self._first_contact is not None:
            self._first_contact.cancel()
        return self.client.stop()

    # -- submission -------------------------------------------------------

    def submission(self, job):
        """The FTS job for this staged product: the POST /jobs body, or a failed TransferResult."""
        if not job.stager_path:
            return TransferResult(False, f"job {job.job_id} has no staged copy to deliver")
        staged = job.stager_path.rstrip("/")
        name = posixpath.basename(staged)
        parent = posixpath.dirname(staged).rstrip("/")
        files = job.files() or (StagedFile(name),)
        outside = [f.path for f in files if not safe_relative(f.path, name)]
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
            raise ServiceAway(str(error), self.poll_interval) from error

    async def _submit(self, job, body):
        fts_jobid = deterministic_job_id(await self.client.vo(), job.job_id)
        if job.fts_jobid and job.fts_jobid != fts_jobid:
            known = await self.client.status([job.fts_jobid], file_fields=())
            if isinstance(known.get(job.fts_jobid), dict):
                self.log.warn("job {job_id}: FTS already has its job {recorded} (predicted in another VO); "
                              "not submitted again", job_id=job.job_id, recorded=job.fts_jobid)
                return None
        if job.fts_jobid != fts_jobid:
            # Recorded before the POST: whatever happens next, we know FTS's id for it.
            if not await self.store.record_transfer_id(job.job_id, job.status, fts_jobid):
                self.log.info("job {job_id} is no longer {status}: not submitted to FTS",
                              job_id=job.job_id, status=job.status)
                return None
        try:
            returned = await self.client.submit(body)
        except FTSConflict:
            self.log.info("job {job_id}: FTS already has its job {fts_jobid}; not submitted again",
                          job_id=job.job_id, fts_jobid=fts_jobid)
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
            await self.store.record_transfer_id(job.job_id, job.status, returned)
        # Debug: the operator's line is the job's STAGED -> TRANSFERRING; the FTS job id is in its status.
        self.log.debug("job {job_id}: submitted to FTS as {fts_jobid}, {files} file(s)",
                      job_id=job.job_id, fts_jobid=returned, files=len(body["files"]))
        return None


def from_config(config, reactor, clock, store, metrics=None):
    """The FTS mover from [fts] (transferd.config has checked endpoint, auth, files and source_template)."""
    from transferd.config import ConfigError

    section = config.fts
    try:
        client = FTSClient(
            section.endpoint, reactor, clock, auth=section.auth,
            token_file=section.token_file, cert=section.cert, key=section.key, proxy=section.proxy,
            ca_path=section.ca_path, vo=section.vo,
            delegation_min_lifetime=section.delegation_min_lifetime, metrics=metrics,
        )
    except ValueError as error:
        raise ConfigError(f"[fts]: {error}") from None
    return FTSMover(
        client, store, clock,
        source_template=section.source_template,
        poll_interval=section.poll_interval,
        max_poll_interval=section.max_poll_interval,
        bulk_size=section.bulk_size,
        transfer_timeout=section.transfer_timeout,
        verify_checksum=section.verify_checksum,
        overwrite=section.overwrite,
        retry=section.retry,
        priority=int(section.priority),
        give_up_after=section.give_up_after,
    )
