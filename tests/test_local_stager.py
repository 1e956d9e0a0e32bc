import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from transferd.interfaces import ServiceAway
from transferd.stagers.local import LocalStager
from tests.contract_stager import (
    DIR_CONTENT, DIR_PRODUCT, FILE_CONTENT, FILE_PRODUCT, StagerContract, a_job, read_tree, write_archive,
)


class LocalStagerContractTests(StagerContract, unittest.TestCase):
    def make_stager(self, archive_root, staging_root):
        return LocalStager(archive_root, staging_root, reactor, hostname="stager.example.org")


class LocalStagerTests(unittest.TestCase):
    def setUp(self):
        self.archive_root = os.path.abspath(self.mktemp())
        self.staging_root = os.path.abspath(self.mktemp())
        write_archive(self.archive_root)
        self.clock = task.Clock()
        self.stager = LocalStager(self.archive_root, self.staging_root, self.clock, delay=30.0, timeout=120.0,
                                  max_attempts=5, hostname="stager.example.org")
        self.stager.startService()
        self.addCleanup(lambda: self.stager.running and self.stager.stopService())

    @defer.inlineCallbacks
    def test_check_knows_at_once(self):
        """check() answers True for an archived product and False for any other name."""
        self.assertIs((yield self.stager.check(FILE_PRODUCT)), True)
        self.assertIs((yield self.stager.check(DIR_PRODUCT)), True)
        self.assertIs((yield self.stager.check("missing")), False)
        self.assertIs((yield self.stager.check(".hidden")), False)

    def test_settings(self):
        """The timeout and attempt limit are the ones given; stage() calls are served one by one."""
        self.assertEqual((self.stager.timeout, self.stager.max_attempts, self.stager.batch_size), (120.0, 5, 1))

    @defer.inlineCallbacks
    def test_recall_waits_for_the_delay(self):
        """Nothing is copied before the recall delay has passed on the clock; then the product is staged."""
        job = a_job(FILE_PRODUCT)
        staging = self.stager.stage(job, "code")
        self.clock.advance(29.9)
        self.assertNoResult(staging)
        self.assertFalse(os.path.exists(os.path.join(self.staging_root, job.job_id)))
        self.clock.advance(0.1)
        result = yield staging
        self.assertTrue(result.success, result.msg)
        self.assertEqual(result.staged_to, "stager.example.org")
        self.assertEqual(result.path, os.path.join(self.staging_root, job.job_id, FILE_PRODUCT))
        self.assertIn("staged", result.msg)

    @defer.inlineCallbacks
    def test_restage_replaces_leftovers(self):
        """A re-stage after a crash replaces both a half copy and a stale complete one."""
        job = a_job(DIR_PRODUCT)
        job_dir = os.path.join(self.staging_root, job.job_id)
        os.makedirs(os.path.join(job_dir, DIR_PRODUCT))
        with open(os.path.join(job_dir, DIR_PRODUCT, "stale"), "wb") as out:
            out.write(b"from an older attempt")
        with open(os.path.join(job_dir, f".{DIR_PRODUCT}.partial"), "wb") as out:
            out.write(b"half")
        staging = self.stager.stage(job, "code")
        self.clock.advance(30)
        result = yield staging
        self.assertTrue(result.success, result.msg)
        self.assertEqual(read_tree(result.path), DIR_CONTENT)
        self.assertEqual(os.listdir(job_dir), [DIR_PRODUCT])

    @defer.inlineCallbacks
    def test_cancel_during_recall(self):
        """Cancelling a job whose recall is still waiting fires a failed result and copies nothing."""
        job = a_job(FILE_PRODUCT)
        staging = self.stager.stage(job, "code")
        yield self.stager.cancel(job)
        result = yield staging
        self.assertFalse(result.success)
        self.assertIn("cancelled", result.msg)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(os.path.exists(os.path.join(self.staging_root, job.job_id)))

    @defer.inlineCallbacks
    def test_stop_cancels_recalls(self):
        """Stopping drops the recalls still waiting: their staging fails with CancelledError."""
        staging = self.stager.stage(a_job(FILE_PRODUCT), "code")
        yield self.stager.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        yield self.assertFailure(staging, defer.CancelledError)

    @defer.inlineCallbacks
    def test_cancelled_stage_call_stops_the_recall(self):
        """Cancelling a stage() Deferred during the recall (the daemon stopping) leaves no timer and copies nothing."""
        job = a_job(FILE_PRODUCT)
        staging = self.stager.stage(job, "code")
        staging.cancel()
        yield self.assertFailure(staging, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(30)
        self.assertFalse(os.path.exists(os.path.join(self.staging_root, job.job_id)))

    @defer.inlineCallbacks
    def test_disk_trouble_fails_the_deferred(self):
        """A staging area that cannot be written fails the Deferred, so the pipeline retries."""
        with open(self.staging_root, "wb") as out:
            out.write(b"not a directory")
        staging = self.stager.stage(a_job(FILE_PRODUCT), "code")
        self.clock.advance(30)
        yield self.assertFailure(staging, OSError)

    @defer.inlineCallbacks
    def test_single_file_product_lists_itself(self):
        """A single-file product's file list names the product itself."""
        staging = self.stager.stage(a_job(FILE_PRODUCT), "code")
        self.clock.advance(30)
        result = yield staging
        self.assertEqual([f.path for f in result.files], [FILE_PRODUCT])
        self.assertEqual(result.files[0].size, len(FILE_CONTENT))

    @defer.inlineCallbacks
    def test_archive_gone_is_the_stager_away(self):
        """When the archive itself is gone (unmounted), staging fails with ServiceAway and check() cannot tell."""
        os.rename(self.archive_root, self.archive_root + ".away")
        self.assertIsNone((yield self.stager.check(FILE_PRODUCT)))
        staging = self.stager.stage(a_job(FILE_PRODUCT), "code")
        self.clock.advance(30)
        away = yield self.assertFailure(staging, ServiceAway)
        self.assertEqual(str(away), f"the archive root {self.archive_root} is not a directory (is the archive mounted?)")
        self.assertEqual(away.retry_after, self.stager.retry_delay)
