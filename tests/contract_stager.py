"""The Stager contract: every IStager implementation must pass these.

A concrete test case mixes StagerContract into trial's TestCase and provides
make_stager(archive_root, staging_root), returning a stager (a service, not
yet started) that serves the products under archive_root.  A stager that reports later (stage() fires
None) overrides finish(stager, job, result) to fire with the final
StageResult.  The staged copy is read from disk at StageResult.path, so the
stager under test must stage onto this host.
"""

import os
import zlib

from twisted.internet import defer
from zope.interface.verify import verifyObject

from transferd import jobs
from transferd.interfaces import IStager
from tests.support import wait_for

# A file product bigger than one 1 MiB checksum chunk, and a directory product.
FILE_PRODUCT = "file-prod"
FILE_CONTENT = bytes(range(256)) * 10_000 + b"tail"
DIR_PRODUCT = "dir-prod"
DIR_CONTENT = {
    "a.dat": b"alpha\n",
    "empty": b"",
    "sub/b.dat": b"\x00\xff" * 5000,
    "sub/deeper/c.dat": b"gamma" * 333,
}


def adler32(data):
    return "adler32:%08x" % zlib.adler32(data)


def write_archive(root):
    """Create the contract's products under root."""
    os.makedirs(root)
    with open(os.path.join(root, FILE_PRODUCT), "wb") as out:
        out.write(FILE_CONTENT)
    for relative, data in DIR_CONTENT.items():
        path = os.path.join(root, DIR_PRODUCT, *relative.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(data)


def read_tree(path):
    """{relative path: bytes} of every file under path."""
    found = {}
    for directory, _subdirs, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            with open(full, "rb") as data:
                found[os.path.relpath(full, path).replace(os.sep, "/")] = data.read()
    return found


def a_job(product_id, **overrides):
    return jobs.Job(job_id=jobs.new_job_id(), product_id=product_id,
                    destination_path="file:///tmp/deliveries", status=jobs.STAGING, **overrides)


def check_pollers(test, backend):
    """backend.pollers() gives new services each time, none of them running yet (stager and mover contracts)."""
    first, second = backend.pollers(outcomes=None), backend.pollers(outcomes=None)
    test.assertEqual(len(first), len(second))
    for poller in first:
        test.assertFalse(poller.running)
        test.assertNotIn(poller, second)


class StagerContract:
    def make_stager(self, archive_root, staging_root):
        raise NotImplementedError

    def finish(self, stager, job, result):
        """Fire with the final StageResult of a stage() that fired result (in-line stagers: as is)."""
        return defer.succeed(result)

    def setUp(self):
        self.archive_root = os.path.abspath(self.mktemp())
        self.staging_root = os.path.abspath(self.mktemp())
        write_archive(self.archive_root)
        os.makedirs(self.staging_root)
        self.stager = self.make_stager(self.archive_root, self.staging_root)
        self.stager.startService()
        self.addCleanup(self._stop)

    def _stop(self):
        return self.stager.stopService() if self.stager.running else None

    @defer.inlineCallbacks
    def _stage(self, job):
        result = yield self.stager.stage(job, "authcode-" + job.job_id)
        return (yield self.finish(self.stager, job, result))

    def test_provides_interface(self):
        """The stager provides IStager, with a positive timeout, at least one attempt and a batch size."""
        self.assertTrue(verifyObject(IStager, self.stager))
        self.assertGreater(self.stager.timeout, 0)
        self.assertGreaterEqual(self.stager.max_attempts, 1)
        self.assertGreaterEqual(self.stager.batch_size, 1)

    @defer.inlineCallbacks
    def test_check(self):
        """check() never claims a missing product exists, nor denies an archived one."""
        self.assertIn((yield self.stager.check(FILE_PRODUCT)), (True, None))
        self.assertIn((yield self.stager.check(DIR_PRODUCT)), (True, None))
        self.assertIn((yield self.stager.check("no-such-product")), (False, None))

    @defer.inlineCallbacks
    def test_stage_file_product(self):
        """A staged file product is a byte-for-byte copy, described by one file with size and adler32."""
        result = yield self._stage(a_job(FILE_PRODUCT))
        self.assertTrue(result.success, result.msg)
        self.assertTrue(result.staged_to)
        self.assertTrue(os.path.isabs(result.path))
        self.assertEqual(os.path.basename(result.path), FILE_PRODUCT)
        with open(result.path, "rb") as staged:
            self.assertEqual(staged.read(), FILE_CONTENT)
        self.assertEqual(result.files, (jobs.StagedFile(FILE_PRODUCT, len(FILE_CONTENT), adler32(FILE_CONTENT)),))

    @defer.inlineCallbacks
    def test_stage_directory_product(self):
        """A staged directory product copies every nested file and lists them sorted, under the product name."""
        result = yield self._stage(a_job(DIR_PRODUCT))
        self.assertTrue(result.success, result.msg)
        self.assertEqual(os.path.basename(result.path), DIR_PRODUCT)
        self.assertEqual(read_tree(result.path), DIR_CONTENT)
        expected = tuple(
            jobs.StagedFile(f"{DIR_PRODUCT}/{relative}", len(data), adler32(data))
            for relative, data in sorted(DIR_CONTENT.items())
        )
        self.assertEqual(result.files, expected)

    @defer.inlineCallbacks
    def test_unknown_product(self):
        """Staging a product the archive lacks fires a failed result naming it."""
        result = yield self._stage(a_job("no-such-product"))
        self.assertFalse(result.success)
        self.assertIn("no-such-product", result.msg)

    @defer.inlineCallbacks
    def test_product_removed_since_submit(self):
        """A product that left the archive after its job was submitted fails to stage, with a reason."""
        self.assertIn((yield self.stager.check(FILE_PRODUCT)), (True, None))
        os.unlink(os.path.join(self.archive_root, FILE_PRODUCT))
        result = yield self._stage(a_job(FILE_PRODUCT))
        self.assertFalse(result.success)
        self.assertIn(FILE_PRODUCT, result.msg)

    @defer.inlineCallbacks
    def test_path_product_ids_refused(self):
        """A product id that is not one plain name never stages anything from outside the archive."""
        with open(os.path.join(os.path.dirname(self.archive_root), "secret"), "wb") as out:
            out.write(b"outside the archive")
        for product_id in ("../secret", "..", ".", f"{DIR_PRODUCT}/a.dat", "/etc/hostname", ""):
            self.assertIn((yield self.stager.check(product_id)), (False, None), product_id)
            result = yield self._stage(a_job(product_id))
            self.assertFalse(result.success, product_id)

    @defer.inlineCallbacks
    def test_restage_same_job(self):
        """Staging the same job again (after a crash) gives one complete copy again."""
        job = a_job(DIR_PRODUCT)
        first = yield self._stage(job)
        again = yield self._stage(job)
        self.assertTrue(again.success, again.msg)
        self.assertEqual(again.files, first.files)
        self.assertEqual(read_tree(again.path), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_jobs_are_staged_apart(self):
        """Two jobs for the same product get copies of their own: releasing one keeps the other."""
        one, two = a_job(FILE_PRODUCT), a_job(FILE_PRODUCT)
        first = yield self._stage(one)
        second = yield self._stage(two)
        self.assertNotEqual(first.path, second.path)
        yield self.stager.free_copy(one)
        yield wait_for(lambda: not os.path.exists(first.path))
        with open(second.path, "rb") as staged:
            self.assertEqual(staged.read(), FILE_CONTENT)

    @defer.inlineCallbacks
    def test_free_copy(self):
        """free_copy() of an ended job frees its staged copy; freeing it again is harmless."""
        job = a_job(DIR_PRODUCT)
        result = yield self._stage(job)
        yield self.stager.free_copy(job)
        yield wait_for(lambda: not os.path.exists(result.path))
        yield self.stager.free_copy(job)

    @defer.inlineCallbacks
    def test_cancel_and_free_unknown_job(self):
        """Cancelling, or freeing the copy of, a job the stager never saw succeeds quietly."""
        job = a_job(FILE_PRODUCT)
        yield self.stager.cancel(job)
        yield self.stager.free_copy(job)

    def test_pollers_are_new_services(self):
        """pollers() gives new services each time, none of them running yet."""
        check_pollers(self, self.stager)

    @defer.inlineCallbacks
    def test_stop_with_work_pending(self):
        """Stopping with a staging request outstanding fires and leaves the reactor clean."""
        pending = self.stager.stage(a_job(DIR_PRODUCT), "code")
        yield self.stager.stopService()
        try:
            yield pending
        except defer.CancelledError:
            pass

    @defer.inlineCallbacks
    def test_cancelled_stage_call(self):
        """Cancelling a stage() Deferred (the daemon stopping) ends it at once; the stager still stages."""
        pending = self.stager.stage(a_job(DIR_PRODUCT), "code")
        pending.cancel()
        try:
            result = yield pending
        except defer.CancelledError:
            pass
        else:
            self.assertIsNone(result)  # accepted already (reported later)
        result = yield self._stage(a_job(FILE_PRODUCT))
        self.assertTrue(result.success, result.msg)
