import os

from twisted.internet import defer, error, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.trial import unittest

from transferd.movers.local import OWNER_XATTR, DestinationUnavailable, LocalMover
from transferd.testing.webdav import FakeWebDAVServer
from tests.contract_mover import MoverContract, file_url
from tests.contract_stager import DIR_CONTENT, DIR_PRODUCT, FILE_CONTENT, FILE_PRODUCT, read_tree, write_archive
from tests.support import wait_for


class LocalMoverTests(MoverContract, unittest.TestCase):
    """The contract, plus file:// details: ownership marks, counting, leftovers, overwrite, links."""

    def make_mover(self, file_roots):
        mover = LocalMover(file_roots, reactor, reactor)
        self.events = []
        mover.log = Logger(observer=self.events.append)
        return mover

    def delivered_lines(self):
        return [e for e in self.events if e["log_format"].startswith("job {job_id}: delivered")]

    @defer.inlineCallbacks
    def test_delivery_is_marked_counted_and_logged(self):
        """A delivery carries the job id in an xattr, counts once and logs one line with files and bytes."""
        job = self.job(DIR_PRODUCT, file_url(self.root))
        result = yield self.mover.transfer(job)
        self.assertTrue(result.success, result.msg)
        delivered = os.path.join(self.root, DIR_PRODUCT)
        self.assertEqual(os.getxattr(delivered, OWNER_XATTR), job.job_id.encode())
        self.assertEqual(self.mover.deliveries, 1)
        [line] = self.delivered_lines()
        self.assertEqual((line["job_id"], line["files"], line["bytes"], line["destination"]),
                         (job.job_id, len(DIR_CONTENT), sum(map(len, DIR_CONTENT.values())), job.destination_path))

    @defer.inlineCallbacks
    def test_redo_copies_nothing(self):
        """A redo of a job whose product is already in place neither copies nor counts again."""
        job = self.job(FILE_PRODUCT, file_url(self.root))
        yield self.mover.transfer(job)
        before = os.stat(os.path.join(self.root, FILE_PRODUCT))
        again = yield self.mover.transfer(job)
        self.assertTrue(again.success, again.msg)
        self.assertIn("already delivered", again.msg)
        after = os.stat(os.path.join(self.root, FILE_PRODUCT))
        self.assertEqual((before.st_ino, before.st_mtime_ns), (after.st_ino, after.st_mtime_ns))
        self.assertEqual(self.mover.deliveries, 1)
        self.assertEqual(len(self.delivered_lines()), 1)

    @defer.inlineCallbacks
    def test_half_copy_replaced(self):
        """A hidden half copy a crash left behind is replaced, and only the product remains."""
        job = self.job(DIR_PRODUCT, file_url(self.root))
        partial = os.path.join(self.root, f".{DIR_PRODUCT}.transferd-{job.job_id}")
        os.makedirs(partial)
        with open(os.path.join(partial, "a.dat"), "wb") as out:
            out.write(b"al")
        result = yield self.mover.transfer(job)
        self.assertTrue(result.success, result.msg)
        self.assertEqual(os.listdir(self.root), [DIR_PRODUCT])
        self.assertEqual(read_tree(os.path.join(self.root, DIR_PRODUCT)), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_other_jobs_delivery_not_ours(self):
        """A product delivered by another job counts as somebody else's."""
        yield self.mover.transfer(self.job(FILE_PRODUCT, file_url(self.root)))
        result = yield self.mover.transfer(self.job(FILE_PRODUCT, file_url(self.root)))
        self.assertFalse(result.success)
        self.assertIn("already exists", result.msg)
        self.assertEqual(self.mover.deliveries, 1)

    @defer.inlineCallbacks
    def test_overwrite(self):
        """With overwrite=True an existing file or directory of that name is replaced by the product."""
        mover = LocalMover([self.root], reactor, reactor, overwrite=True)
        self.addCleanup(mover.stopService)
        os.makedirs(os.path.join(self.root, FILE_PRODUCT, "old"))
        with open(os.path.join(self.root, DIR_PRODUCT), "wb") as out:
            out.write(b"old file")
        for product in (FILE_PRODUCT, DIR_PRODUCT):
            result = yield mover.transfer(self.job(product, file_url(self.root)))
            self.assertTrue(result.success, result.msg)
        with open(os.path.join(self.root, FILE_PRODUCT), "rb") as delivered:
            self.assertEqual(delivered.read(), FILE_CONTENT)
        self.assertEqual(read_tree(os.path.join(self.root, DIR_PRODUCT)), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_link_out_of_roots_refused(self):
        """A destination inside the roots that is a link to elsewhere is refused."""
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, os.path.join(self.root, "escape"))
        result = yield self.mover.transfer(self.job(FILE_PRODUCT, file_url(os.path.join(self.root, "escape"))))
        self.assertFalse(result.success)
        self.assertIn("outside", result.msg)
        self.assertEqual(os.listdir(outside), [])

    @defer.inlineCallbacks
    def test_remote_file_url_refused(self):
        """A file:// URL naming another host is refused."""
        result = yield self.mover.transfer(self.job(FILE_PRODUCT, "file://elsewhere" + self.root))
        self.assertFalse(result.success)
        self.assertIn("file://elsewhere", result.msg)


class LocalMoverHTTPTests(unittest.TestCase):
    """http(s):// and davs:// delivery against the fake WebDAV server."""

    def setUp(self):
        self.staged = os.path.abspath(self.mktemp())
        write_archive(self.staged)
        self.helper = MoverContract()
        self.helper.staged = self.staged

    @defer.inlineCallbacks
    def serve(self, strict=True, tls=False):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        server = FakeWebDAVServer(root, reactor, strict=strict, tls=tls)
        yield defer.Deferred.fromCoroutine(server.start())
        self.addCleanup(server.stop)
        return server

    def mover(self, server=None, clock=reactor, **kwargs):
        if server is not None:
            kwargs.setdefault("tls_policy", server.client_tls_policy)
        mover = LocalMover([], reactor, clock, **kwargs)
        mover.startService()
        self.addCleanup(mover.stopService)
        return mover

    def job(self, product, destination, **overrides):
        return self.helper.job(product, destination, **overrides)

    @defer.inlineCallbacks
    def test_http_put_per_file(self):
        """Each file of a product is PUT once, with its Content-Length, under <destination>/<product>."""
        server = yield self.serve(strict=False)
        mover = self.mover(server)
        result = yield mover.transfer(self.job(DIR_PRODUCT, server.url + "/store/"))
        self.assertTrue(result.success, result.msg)
        self.assertEqual(read_tree(server.path("/store/" + DIR_PRODUCT)), DIR_CONTENT)
        self.assertEqual(dict(server.puts), {f"/store/{DIR_PRODUCT}/{p}": 1 for p in DIR_CONTENT})
        self.assertEqual({s.path: s.length for s in server.requests},
                         {f"/store/{DIR_PRODUCT}/{p}": len(d) for p, d in DIR_CONTENT.items()})
        self.assertEqual(mover.deliveries, 1)

    @defer.inlineCallbacks
    def test_files_listed_by_walking(self):
        """A job without a recorded file list has its files found on disk and PUT."""
        server = yield self.serve(strict=False)
        mover = self.mover(server)
        result = yield mover.transfer(self.job(DIR_PRODUCT, server.url + "/x", record_files=False))
        self.assertTrue(result.success, result.msg)
        self.assertEqual(read_tree(server.path("/x/" + DIR_PRODUCT)), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_davs_makes_collections_first(self):
        """Over davs (HTTPS) the collections are made parent first, an existing one is fine, then files are PUT."""
        server = yield self.serve(strict=True, tls=True)
        os.makedirs(server.path("/data"))
        mover = self.mover(server)
        result = yield mover.transfer(self.job(DIR_PRODUCT, server.davs_url + "/data"))
        self.assertTrue(result.success, result.msg)
        self.assertIn(server.url, result.msg)
        methods = [(s.method, s.path.rstrip("/")) for s in server.requests]
        self.assertEqual(methods[:4], [("MKCOL", "/data"), ("MKCOL", f"/data/{DIR_PRODUCT}"),
                                       ("MKCOL", f"/data/{DIR_PRODUCT}/sub"),
                                       ("MKCOL", f"/data/{DIR_PRODUCT}/sub/deeper")])
        self.assertEqual({m for m, _ in methods[4:]}, {"PUT"})
        self.assertEqual(read_tree(server.path("/data/" + DIR_PRODUCT)), DIR_CONTENT)

    @defer.inlineCallbacks
    def test_davs_single_file(self):
        """A single-file product over davs is one PUT named after the product."""
        server = yield self.serve(strict=True, tls=True)
        os.makedirs(server.path("/data"))
        result = yield self.mover(server).transfer(self.job(FILE_PRODUCT, server.davs_url + "/data"))
        self.assertTrue(result.success, result.msg)
        self.assertEqual(dict(server.puts), {f"/data/{FILE_PRODUCT}": 1})
        with open(server.path(f"/data/{FILE_PRODUCT}"), "rb") as stored:
            self.assertEqual(stored.read(), FILE_CONTENT)

    @defer.inlineCallbacks
    def test_missing_parent_collection(self):
        """A davs destination whose parent collection is missing fails, saying so."""
        server = yield self.serve(strict=True, tls=True)
        url = server.davs_url + "/no/such"
        result = yield self.mover(server).transfer(self.job(FILE_PRODUCT, url))
        self.assertFalse(result.success)
        self.assertIn("409", result.msg)
        self.assertIn("parent collection", result.msg)

    @defer.inlineCallbacks
    def test_client_error_is_final(self):
        """A 4xx answer fails the transfer with the URL and the status, without counting a delivery."""
        server = yield self.serve(strict=False)
        server.respond_next(403)
        mover = self.mover(server)
        result = yield mover.transfer(self.job(FILE_PRODUCT, server.url + "/d"))
        self.assertFalse(result.success)
        self.assertIn(f"{server.url}/d/{FILE_PRODUCT}", result.msg)
        self.assertIn("403", result.msg)
        self.assertEqual(mover.deliveries, 0)

    @defer.inlineCallbacks
    def test_redirect_is_final(self):
        """A redirect is not followed: the transfer fails and says so."""
        server = yield self.serve(strict=False)
        server.respond_next(307)
        result = yield self.mover(server).transfer(self.job(FILE_PRODUCT, server.url + "/d"))
        self.assertFalse(result.success)
        self.assertIn("redirect", result.msg)

    @defer.inlineCallbacks
    def test_server_error_is_retried(self):
        """A 5xx or 429 answer fails the Deferred (so the queue retries); the retry then delivers."""
        server = yield self.serve(strict=False)
        mover = self.mover(server)
        job = self.job(FILE_PRODUCT, server.url + "/d")
        for status in (503, 429):
            server.respond_next(status)
            failure = yield self.assertFailure(mover.transfer(job), DestinationUnavailable)
            self.assertIn(str(status), str(failure))
        result = yield mover.transfer(job)
        self.assertTrue(result.success, result.msg)
        self.assertEqual(mover.deliveries, 1)

    @defer.inlineCallbacks
    def test_connection_refused_is_retried(self):
        """A refused connection fails the Deferred."""
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        number = port.getHost().port
        yield port.stopListening()
        mover = self.mover()
        yield self.assertFailure(mover.transfer(self.job(FILE_PRODUCT, f"http://127.0.0.1:{number}/d")),
                                 error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_timeout_is_retried(self):
        """A PUT that gets no answer within request_timeout plus its size at min_rate fails the Deferred."""
        server = yield self.serve(strict=False)
        server.hang_next()
        clock = task.Clock()
        mover = self.mover(server, clock=clock, request_timeout=30.0, min_rate=len(FILE_CONTENT) / 2)
        transfer = mover.transfer(self.job(FILE_PRODUCT, server.url + "/d"))
        yield wait_for(lambda: server.dav.hanging)
        clock.advance(31)
        self.assertNoResult(transfer)
        clock.advance(1)
        failure = yield self.assertFailure(transfer, DestinationUnavailable)
        self.assertIn("no complete answer within 32s", str(failure))

    @defer.inlineCallbacks
    def test_staged_file_missing(self):
        """A recorded file the staged copy lacks fails the transfer, naming it."""
        server = yield self.serve(strict=False)
        job = self.job(DIR_PRODUCT, server.url + "/d")
        os.unlink(os.path.join(self.staged, DIR_PRODUCT, "sub", "b.dat"))
        result = yield self.mover(server).transfer(job)
        self.assertFalse(result.success)
        self.assertIn("b.dat", result.msg)

    @defer.inlineCallbacks
    def test_cancel_in_flight(self):
        """Cancelling a job while its PUT hangs ends its transfer with a failed, cancelled result."""
        server = yield self.serve(strict=False)
        server.hang_next()
        mover = self.mover(server)
        job = self.job(FILE_PRODUCT, server.url + "/d")
        transfer = mover.transfer(job)
        yield wait_for(lambda: server.dav.hanging)
        yield mover.cancel(job)
        result = yield transfer
        self.assertFalse(result.success)
        self.assertIn("cancelled", result.msg)

    @defer.inlineCallbacks
    def test_file_list_escaping_product_refused(self):
        """A recorded file list naming paths outside the product is refused before any request."""
        server = yield self.serve(strict=False)
        job = self.job(FILE_PRODUCT, server.url + "/d",
                       staged_files='[{"path": "../../etc/passwd", "size": 1}]')
        result = yield self.mover(server).transfer(job)
        self.assertFalse(result.success)
        self.assertEqual(server.requests, [])

    @defer.inlineCallbacks
    def test_missing_staged_copy(self):
        """A job whose staged copy is gone fails before any request."""
        server = yield self.serve(strict=False)
        job = self.job(FILE_PRODUCT, server.url + "/d", stager_path=os.path.join(self.staged, "gone"),
                       staged_files=None)
        result = yield self.mover(server).transfer(job)
        self.assertFalse(result.success)
        self.assertIn("missing", result.msg)
        self.assertEqual(server.requests, [])
