"""The Mover contract: every IMover implementation must pass these.

A concrete test case mixes MoverContract into trial's TestCase and provides
make_mover(file_roots), returning a mover (a service, not yet started) that
may write file:// URLs under file_roots.  An asynchronous mover (transfer() fires None, a poller reports
later) overrides finish(mover, job, result) to fire with the final
TransferResult, polling as it needs to.
"""

import json
import os
import zlib
from urllib.parse import quote

from twisted.internet import defer
from zope.interface.verify import verifyObject

from transferd import jobs
from transferd.interfaces import IMover
from tests.contract_stager import (
    DIR_CONTENT, DIR_PRODUCT, FILE_CONTENT, FILE_PRODUCT, check_pollers, read_tree, write_archive,
)


def staged_files(product_root, name):
    """The StagedFile list a stager records for product_root/name."""
    path = os.path.join(product_root, name)
    found = []
    for directory, _subdirs, names in os.walk(path) if os.path.isdir(path) else [(product_root, [], [name])]:
        for filename in names:
            full = os.path.join(directory, filename)
            with open(full, "rb") as data:
                content = data.read()
            relative = os.path.relpath(full, product_root).replace(os.sep, "/")
            found.append(jobs.StagedFile(relative, len(content), "adler32:%08x" % zlib.adler32(content)))
    return sorted(found, key=lambda f: f.path)


def file_url(path):
    return "file://" + quote(path)


class MoverContract:
    def make_mover(self, file_roots):
        raise NotImplementedError

    def finish(self, mover, job, result):
        """Fire with the final TransferResult of a transfer() that fired result (in-line movers: as is)."""
        return defer.succeed(result)

    def setUp(self):
        # The staged products, as a stager leaves them: <staging>/<job>/<product>.
        self.staged = os.path.abspath(self.mktemp())
        write_archive(self.staged)
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.mover = self.make_mover([self.root])
        self.mover.startService()
        self.addCleanup(lambda: self.mover.running and self.mover.stopService())

    def job(self, product_id, destination, record_files=True, **overrides):
        """A TRANSFERRING job whose product was staged under self.staged."""
        files = staged_files(self.staged, product_id) if record_files else []
        values = dict(
            job_id=jobs.new_job_id(), product_id=product_id, destination_path=destination,
            status=jobs.TRANSFERRING, stager_path=os.path.join(self.staged, product_id),
            stager_hostname="localhost",
            staged_files=json.dumps([f.to_dict() for f in files]) if files else None,
        )
        values.update(overrides)
        return jobs.Job(**values)

    @defer.inlineCallbacks
    def _transfer(self, job):
        result = yield self.mover.transfer(job)
        return (yield self.finish(self.mover, job, result))

    def test_provides_interface(self):
        """The mover provides IMover and names the schemes it writes, file among them."""
        self.assertTrue(verifyObject(IMover, self.mover))
        self.assertIsInstance(self.mover.schemes, frozenset)
        self.assertIn("file", self.mover.schemes)

    @defer.inlineCallbacks
    def test_file_product(self):
        """A file product arrives byte for byte as <destination>/<product>."""
        destination = os.path.join(self.root, "deliveries")
        result = yield self._transfer(self.job(FILE_PRODUCT, file_url(destination)))
        self.assertTrue(result.success, result.msg)
        with open(os.path.join(destination, FILE_PRODUCT), "rb") as delivered:
            self.assertEqual(delivered.read(), FILE_CONTENT)

    @defer.inlineCallbacks
    def test_directory_product(self):
        """A directory product arrives as the same tree, every file byte for byte."""
        destination = os.path.join(self.root, "a", "b")
        result = yield self._transfer(self.job(DIR_PRODUCT, file_url(destination)))
        self.assertTrue(result.success, result.msg)
        self.assertEqual(read_tree(os.path.join(destination, DIR_PRODUCT)), DIR_CONTENT)
        self.assertEqual(os.listdir(destination), [DIR_PRODUCT])

    @defer.inlineCallbacks
    def test_files_not_recorded(self):
        """A job whose stager recorded no file list is still delivered whole."""
        destination = os.path.join(self.root, "deliveries")
        result = yield self._transfer(self.job(DIR_PRODUCT, file_url(destination), record_files=False))
        self.assertTrue(result.success, result.msg)
        self.assertEqual(read_tree(os.path.join(destination, DIR_PRODUCT)), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_outside_roots_refused(self):
        """A file:// destination outside the roots fails, naming it, and nothing is written there."""
        outside = os.path.abspath(self.mktemp())
        for url in (file_url(outside), file_url(self.root + "/../" + os.path.basename(outside))):
            result = yield self._transfer(self.job(FILE_PRODUCT, url))
            self.assertFalse(result.success)
            self.assertIn(url, result.msg)
        self.assertFalse(os.path.exists(outside))

    @defer.inlineCallbacks
    def test_missing_staged_copy(self):
        """A job whose staged copy is gone fails with a reason instead of delivering nothing."""
        job = self.job(FILE_PRODUCT, file_url(self.root), stager_path=os.path.join(self.staged, "gone"))
        result = yield self._transfer(job)
        self.assertFalse(result.success)
        self.assertTrue(result.msg)
        self.assertEqual(os.listdir(self.root), [])

    @defer.inlineCallbacks
    def test_existing_destination_kept(self):
        """A product already at the destination that is not this job's is left alone and the job fails."""
        with open(os.path.join(self.root, FILE_PRODUCT), "wb") as out:
            out.write(b"somebody else's")
        result = yield self._transfer(self.job(FILE_PRODUCT, file_url(self.root)))
        self.assertFalse(result.success)
        self.assertIn("exists", result.msg)
        with open(os.path.join(self.root, FILE_PRODUCT), "rb") as kept:
            self.assertEqual(kept.read(), b"somebody else's")

    @defer.inlineCallbacks
    def test_redo_after_crash(self):
        """Transferring a job again (the daemon died before recording SUCCESS) succeeds and keeps one copy."""
        job = self.job(DIR_PRODUCT, file_url(self.root))
        first = yield self._transfer(job)
        again = yield self._transfer(job)
        self.assertTrue(first.success, first.msg)
        self.assertTrue(again.success, again.msg)
        self.assertEqual(os.listdir(self.root), [DIR_PRODUCT])
        self.assertEqual(read_tree(os.path.join(self.root, DIR_PRODUCT)), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_two_jobs_same_destination(self):
        """Two jobs delivering different products to one directory both arrive."""
        one = yield self._transfer(self.job(FILE_PRODUCT, file_url(self.root)))
        two = yield self._transfer(self.job(DIR_PRODUCT, file_url(self.root)))
        self.assertTrue(one.success and two.success, (one.msg, two.msg))
        self.assertEqual(sorted(os.listdir(self.root)), sorted([FILE_PRODUCT, DIR_PRODUCT]))

    @defer.inlineCallbacks
    def test_cancel_unknown_job(self):
        """Cancelling a job the mover is not running succeeds quietly."""
        yield self.mover.cancel(self.job(FILE_PRODUCT, file_url(self.root)))

    @defer.inlineCallbacks
    def test_stop_after_work(self):
        """Stopping after a transfer fires and leaves the reactor clean."""
        result = yield self._transfer(self.job(FILE_PRODUCT, file_url(self.root)))
        self.assertTrue(result.success, result.msg)
        yield self.mover.stopService()

    def test_pollers_are_new_services(self):
        """pollers() gives new services each time, none of them running yet."""
        check_pollers(self, self.mover)
