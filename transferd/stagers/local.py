"""The embedded stager: "tape" is a local directory, "recall" is a delayed copy.

It lets transferd run (and be tested end to end) without a real tape system:
a product is a file or directory named product_id directly under archive_root;
staging waits `delay` seconds on the clock (the simulated tape recall), then
copies the product to staging_root/<job_id>/<product_id> in a thread.
"""

import os
import shutil
import socket
import zlib

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from transferd.interfaces import IStager
from transferd.jobs import StagedFile, StageResult

CHUNK = 1 << 20  # checksums and copies stream in 1 MiB chunks


def is_plain_name(name):
    """True when name is one ordinary path component: no separator, not hidden, not '.' or '..'."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\0" not in name
        and (os.altsep is None or os.altsep not in name)
    )


def _copy_file(src, dst):
    """Copy src to a new file dst, fsync it, and fire with (size, adler32) of the bytes written."""
    size, adler = 0, 1
    with open(src, "rb") as reader, open(dst, "xb") as writer:
        while True:
            chunk = reader.read(CHUNK)
            if not chunk:
                break
            writer.write(chunk)
            size += len(chunk)
            adler = zlib.adler32(chunk, adler)
        writer.flush()
        os.fsync(writer.fileno())
    return size, adler


def _remove(path):
    """Remove a file or a directory tree if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


@implementer(IStager)
class LocalStager:
    """Stages products from a local archive directory, in-line (stage() fires with the result)."""

    log = Logger()

    def __init__(self, archive_root, staging_root, delay=0.0, timeout=3600.0, max_attempts=3,
                 clock=None, hostname=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.archive_root = archive_root
        self.staging_root = staging_root
        self.delay = delay
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.clock = clock
        self.hostname = hostname or socket.getfqdn()
        self._recalls = {}  # job_id -> {recall Deferred still waiting: why it was cancelled}

    # -- IStager ----------------------------------------------------------

    def check(self, product_id):
        """Fire with whether the product is in the archive (one stat: we know at once)."""
        return defer.succeed(is_plain_name(product_id) and os.path.exists(self._source(product_id)))

    def stage(self, job, authcode):
        """Wait out the simulated recall, then copy the product; fire with a StageResult.

        Permanent problems (no such product) fire a failed StageResult;
        anything unexpected (disk full, I/O error) fails the Deferred so that
        the pipeline retries through its queue.
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

    def cancel(self, job):
        """Stop a recall still waiting (its stage() fires a failed result) and drop the copy."""
        for recall in list(self._recalls.get(job.job_id, ())):
            self._recalls[job.job_id][recall] = "cancelled"
            recall.cancel()
        return self._remove_job_dir(job)

    def release(self, job):
        """The job has ended: free its staged copy."""
        return self._remove_job_dir(job)

    def close(self):
        """Cancel the recalls still waiting: their stage() Deferreds fail with CancelledError."""
        for recall in [d for pending in self._recalls.values() for d in pending]:
            recall.cancel()
        return defer.succeed(None)

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
            self.log.info("job {job_id}: staged {product_id} to {path}: {msg}",
                          job_id=job.job_id, product_id=job.product_id, path=result.path, msg=result.msg)
        return result

    def _stage_now(self, job):
        """Copy the product into the staging area (runs in a thread)."""
        product_id = job.product_id
        source = self._source(product_id)
        missing = StageResult(success=False, msg=f"product {product_id!r} is not in the archive")
        if not os.path.exists(source):
            if not os.path.isdir(self.archive_root):  # an unmounted archive: try again later
                raise FileNotFoundError(f"archive root {self.archive_root} is not a directory")
            return missing
        job_dir = os.path.join(self.staging_root, job.job_id)
        final = os.path.join(job_dir, product_id)
        partial = os.path.join(job_dir, f".{product_id}.partial")
        os.makedirs(job_dir, exist_ok=True)
        _remove(partial)  # a copy a crash interrupted
        try:
            files = self._copy(source, partial, product_id)
        except FileNotFoundError:
            if not os.path.exists(source):  # removed from the archive while we copied
                _remove(partial)
                return missing
            raise
        _remove(final)  # an earlier attempt's copy: redo it rather than trust it
        os.rename(partial, final)
        total = sum(f.size for f in files)
        return StageResult(
            success=True,
            msg=f"staged {len(files)} file(s), {total} bytes",
            staged_to=self.hostname,
            path=os.path.abspath(final),
            files=tuple(sorted(files, key=lambda f: f.path)),
        )

    @staticmethod
    def _copy(source, target, name):
        """Copy a file or tree source to target; return StagedFiles with paths under name/.

        Links to files are copied as files; links to directories are not followed.
        """
        if not os.path.isdir(source):
            size, adler = _copy_file(source, target)
            return [StagedFile(name, size, "adler32:%08x" % adler)]
        files = []
        for directory, _subdirs, names in os.walk(source):
            relative = os.path.relpath(directory, source)
            os.makedirs(os.path.join(target, relative), exist_ok=True)
            for filename in names:
                size, adler = _copy_file(os.path.join(directory, filename),
                                         os.path.join(target, relative, filename))
                path = os.path.normpath(os.path.join(name, relative, filename)).replace(os.sep, "/")
                files.append(StagedFile(path, size, "adler32:%08x" % adler))
        return files

    def _remove_job_dir(self, job):
        if not is_plain_name(job.job_id):
            return defer.succeed(None)
        job_dir = os.path.join(self.staging_root, job.job_id)
        d = threads.deferToThread(shutil.rmtree, job_dir, ignore_errors=True)
        d.addErrback(lambda failure: self.log.failure("job {job_id}: removing {path}", failure,
                                                      job_id=job.job_id, path=job_dir))
        return d



def from_config(config, clock, store):
    """The local stager from [stager]: archive_root must exist; staging_root is created."""
    from transferd.config import ConfigError

    section = config.stager
    os.makedirs(section.staging_root, exist_ok=True)
    if not os.path.isdir(section.archive_root):
        raise ConfigError(f"[stager] archive_root {section.archive_root!r} is not a directory")
    return LocalStager(
        archive_root=os.path.abspath(section.archive_root),
        staging_root=os.path.abspath(section.staging_root),
        delay=section.delay,
        timeout=section.timeout,
        max_attempts=section.max_attempts,
        clock=clock,
    )
