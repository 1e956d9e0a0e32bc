"""The FTS3 client against the fake FTS3 over real loopback HTTP(S): answers, failures, credentials."""

import contextlib
import os
import shutil
import uuid

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from transferd.fts.client import (
    BASE_ID,
    FTSClient,
    FTSConflict,
    FTSCredentialsError,
    FTSRefused,
    FTSUnavailable,
    deterministic_job_id,
)
from transferd.testing.fakefts import FakeFTSServer, TestPKI
from transferd.testing.tokens import TokenIssuer
from transferd.tls import load_trust_root

TOKEN = "token-one"


@contextlib.contextmanager
def capture_errors():
    """The error-level log events emitted inside the block."""
    events = []

    def observer(event):
        if event.get("log_level") == LogLevel.error:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


def job(sid, name="p", **params):
    return {
        "files": [{"sources": [f"gsiftp://src.example.org/staged/{name}"],
                   "destinations": [f"gsiftp://dst.example.org/out/{name}"], "filesize": 10}],
        "params": dict({"id_generator": "deterministic", "sid": sid}, **params),
    }


class ClientTestCase(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.token_file = os.path.join(self.base, "token")
        self.write_token(TOKEN)

    def write_token(self, token):
        partial = self.token_file + ".new"
        with open(partial, "w") as handle:
            handle.write(token + "\n")
        os.replace(partial, self.token_file)  # as token renewers do: a new inode every time

    async def start(self, tls_options=None, **options):
        options.setdefault("token", TOKEN)
        self.server = FakeFTSServer(reactor, tls_options=tls_options, **options)
        await self.server.start()
        self.addCleanup(self.server.stop)
        self.fake = self.server.fake
        return self.server

    def client(self, **options):
        options.setdefault("auth", "token")
        options.setdefault("token_file", self.token_file)
        options.setdefault("request_timeout", 5)
        client = FTSClient(self.server.url, reactor, reactor, **options)
        self.addCleanup(client.stop)
        return client


class DeterministicIdTests(unittest.TestCase):
    def test_known_value(self):
        """The predicted id is uuid5(uuid5(FTS's base id, vo), sid), as fts-rest-flask computes it."""
        self.assertEqual(str(BASE_ID), "01874efb-4735-4595-bc9c-591aef8240c9")
        self.assertEqual(deterministic_job_id("transferd", "sid-1"), "00d09b8b-753d-508d-b69a-0d6c470eef9b")
        self.assertNotEqual(deterministic_job_id("other", "sid-1"), deterministic_job_id("transferd", "sid-1"))


class TokenClientTests(ClientTestCase):
    async def test_version_whoami_and_vo(self):
        """The client reads FTS's api version, who it is, and learns its VO from /whoami."""
        await self.start(vo="skao")
        client = self.client()
        self.assertEqual(await client.version(), {"major": 3, "minor": 13, "patch": 4})
        self.assertEqual((await client.whoami())["method"], "oauth2")
        self.assertEqual(await client.vo(), "skao")
        await client.vo()
        self.assertEqual(self.fake.count("GET", "/whoami"), 2, "the VO is asked once")

    async def test_one_whoami_at_a_time(self):
        """Eight submissions starting at once share one /whoami to learn the VO."""
        await self.start()
        client = self.client()
        vos = await defer.gatherResults([defer.ensureDeferred(client.vo()) for _ in range(8)])
        self.assertEqual(vos, ["iam.example.org"] * 8)
        self.assertEqual(self.fake.count("GET", "/whoami"), 1)

    async def test_configured_vo_must_be_ftss(self):
        """A configured VO that /whoami contradicts is a credentials error naming [fts] vo; the right one is accepted."""
        await self.start()
        with self.assertRaises(FTSCredentialsError) as caught:
            await self.client(vo="transferd").vo()
        self.assertIn("[fts] vo = transferd", caught.exception.message)
        self.assertIn("'iam.example.org'", caught.exception.message)
        self.assertEqual(await self.client(vo="iam.example.org").vo(), "iam.example.org")

    async def test_vo_learnt_again_for_a_new_token(self):
        """When the token file holds a token of another issuer, the VO is learnt again from /whoami."""
        first, second = (TokenIssuer(f"https://{host}/").token() for host in ("iam.one.example", "iam.two.example"))
        await self.start(token=None, tokens=[first, second])
        self.write_token(first)
        client = self.client()
        self.assertEqual(await client.vo(), "iam.one.example")
        self.write_token(second)
        self.assertEqual(await client.vo(), "iam.two.example")
        self.assertEqual(self.fake.count("GET", "/whoami"), 2)

    async def test_submit_predicts_the_id_and_409_on_repeat(self):
        """FTS assigns exactly the predicted id; a second submission of the sid is FTSConflict."""
        await self.start()
        client = self.client()
        sid = str(uuid.uuid4())
        self.assertEqual(await client.submit(job(sid)), deterministic_job_id(await client.vo(), sid))
        with self.assertRaises(FTSConflict):
            await client.submit(job(sid))
        self.assertEqual(len(self.fake.jobs_for_sid(sid)), 1)

    async def test_4xx_is_a_refusal_with_ftss_message(self):
        """A 400 is FTSRefused carrying FTS's own message."""
        await self.start()
        client = self.client()
        body = job("x")
        body["files"][0]["destinations"] = ["gsiftp:///no-host"]
        with self.assertRaises(FTSRefused) as caught:
            await client.submit(body)
        self.assertEqual(caught.exception.code, 400)
        self.assertIn("Missing host", caught.exception.message)

    async def test_5xx_down_and_silent_are_unavailable(self):
        """5xx, a refused connection and a server that never answers are FTSUnavailable."""
        await self.start()
        client = self.client(request_timeout=0.5)
        self.fake.respond_next(503, body=b'{"status": "503", "message": "database is away"}')
        with self.assertRaises(FTSUnavailable) as caught:
            await client.submit(job("a"))
        self.assertIn("database is away", caught.exception.message)
        self.fake.hang_next()
        with self.assertRaises(FTSUnavailable) as caught:
            await client.status(["x"])
        self.assertIn("no complete answer within 0.5s", caught.exception.message)
        await self.server.stop_listening()
        with self.assertRaises(FTSUnavailable):
            await client.submit(job("a"))
        self.assertEqual(self.fake.jobs, {})

    async def test_bulk_status_207_and_404(self):
        """Bulk status maps known ids to jobs and unknown ones to None (207); a lone unknown id is None."""
        await self.start(slow=["slow=30"])
        client = self.client()
        known = [await client.submit(job(f"s{i}", name="slow")) for i in range(3)]
        unknown = str(uuid.uuid4())
        answers = await client.status(known + [unknown])
        self.assertEqual(set(answers), set(known) | {unknown})
        self.assertIsNone(answers[unknown])
        self.assertLessEqual({answers[i]["job_state"] for i in known}, {"SUBMITTED", "ACTIVE"})
        self.assertIn("file_state", answers[known[0]]["files"][0])
        self.assertEqual(await client.status([unknown]), {unknown: None})
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}"), 2)

    async def test_a_404_that_does_not_name_the_job_is_not_lost(self):
        """A 404 from a wrong URL (not naming the job) does not declare the job lost."""
        await self.start()
        client = self.client()
        self.fake.respond_next(404, body=b"<html>Not Found</html>")
        self.assertEqual(await client.status([str(uuid.uuid4())]), {})

    async def test_cancel(self):
        """cancel() fires with the CANCELED job, a 304 marker once it has ended (in a 200's body or as HTTP 304), None when unknown."""
        await self.start(slow=["slow=30"])
        client = self.client()
        fts_id = await client.submit(job("c", name="slow"))
        self.assertEqual((await client.cancel(fts_id))["job_state"], "CANCELED")
        again = await client.cancel(fts_id)
        self.assertEqual((again["http_status"], again["job_state"]), ("304 Not Modified", "CANCELED"))
        self.fake.cancel_ended_http_304 = True
        self.assertEqual(await client.cancel(fts_id), {"job_id": fts_id, "http_status": "304 Not Modified"})
        self.assertIsNone(await client.cancel(str(uuid.uuid4())))
        self.assertEqual(self.fake.count("DELETE", "/jobs/{ids}"), 4)

    def test_poll_batches_stay_under_the_path_limit(self):
        """However large bulk_size is, a poll carries at most 103 job ids: its path stays under 3,840 bytes."""
        client = FTSClient("https://fts.example.org:8446", reactor, reactor)
        self.addCleanup(client.stop)
        ids = [str(uuid.uuid4()) for _ in range(1000)]
        batches = list(client.batches(ids, bulk_size=500))
        self.assertEqual([len(b) for b in batches], [103] * 9 + [73])
        self.assertEqual(sum(batches, []), ids)
        self.assertLess(max(len("/jobs/" + ",".join(b)) for b in batches), 4096 - 256)
        self.assertEqual([len(b) for b in client.batches(ids[:30], bulk_size=20)], [20, 10])
        prefixed = FTSClient("https://fts.example.org:8446/" + "p" * 1000, reactor, reactor)
        self.addCleanup(prefixed.stop)
        self.assertEqual(len(next(prefixed.batches(ids, bulk_size=500))), 76, "the endpoint's own path counts")

    async def test_a_404_for_many_ids_means_too_long(self):
        """Apache's 404 for a poll of many ids splits the poll in halves and lowers the limit; no job is lost or unknown."""
        await self.start(slow=["slow=30"])
        client = self.client()
        known = [await client.submit(job(f"k{i}", name="slow")) for i in range(3)]
        ids = known + [str(uuid.uuid4()) for _ in range(117)]
        client.max_path_bytes = 10_000  # as if the margin were not there
        answers = await client.status(ids)
        self.assertEqual(set(answers), set(ids))
        self.assertEqual({answers[i]["job_state"] for i in known}, {"ACTIVE"})
        self.assertEqual(sum(answers[i] is None for i in ids), 117)
        self.assertEqual(self.fake.requests["too long"], 1)
        self.assertEqual(client.max_path_bytes, len("/jobs/" + ",".join(ids)) - 1)
        self.assertEqual([len(b) for b in client.batches(ids, bulk_size=200)], [119, 1])

    async def test_token_is_read_again_when_the_file_changes(self):
        """A renewed token file is used at the next call; an unreadable one is a credentials error."""
        await self.start(tokens=["token-two"])
        client = self.client()
        await client.whoami()
        self.write_token("token-two")
        self.assertEqual((await client.whoami())["method"], "oauth2")
        os.unlink(self.token_file)
        with self.assertRaises(FTSCredentialsError) as caught:
            await client.whoami()
        self.assertIn("cannot read the FTS token file", caught.exception.message)

    async def test_token_ftss_takes_for_anonymous(self):
        """A token FTS takes for anonymous (403 on POST, 500 on GET) is a credentials error, logged once, not sent again until the file changes."""
        await self.start(slow=["slow=30"])
        client = self.client()
        running = await client.submit(job("before", name="slow"))
        self.fake.tokens = {"token-two"}
        with capture_errors() as errors:
            with self.assertRaises(FTSCredentialsError) as caught:
                await client.submit(job("refused"))
            self.assertIn("takes us for an anonymous user", caught.exception.message)
            self.assertIn("403: Not enough permissions", caught.exception.message)
            with self.assertRaises(FTSCredentialsError):
                await client.status([running])
            self.assertEqual((self.fake.count("POST", "/jobs"), self.fake.count("GET", "/jobs/{ids}")), (2, 0))
        self.assertEqual(len(errors), 1, errors)
        self.write_token("token-two")
        self.assertEqual((await client.status([running]))[running]["job_state"], "ACTIVE")
        self.assertEqual(await client.submit(job("refused")), deterministic_job_id(await client.vo(), "refused"))

    async def test_500_or_403_while_fts_knows_us_is_ftss_answer(self):
        """A 500 or a 403 while /whoami still names us is FTS's answer: FTS away, or a real refusal."""
        await self.start()
        client = self.client()
        self.fake.respond_next(500, body=b'{"status": "500", "message": "database is away"}')
        with self.assertRaises(FTSUnavailable) as caught:
            await client.status([str(uuid.uuid4())])
        self.assertNotIsInstance(caught.exception, FTSCredentialsError)
        self.fake.respond_next(403, body=b'{"status": "403 Forbidden", "message": "destination banned"}')
        with self.assertRaises(FTSRefused) as caught:
            await client.submit(job("banned"))
        self.assertEqual(caught.exception.message, "destination banned")
        self.assertEqual(self.fake.count("GET", "/whoami"), 2)

    async def test_expired_token_is_not_sent(self):
        """A JWT whose exp has passed is a credentials error before anything is sent; its renewal is used at once."""
        issuer = TokenIssuer("https://iam.example.org/")
        expired, fresh = issuer.token(lifetime=-5), issuer.token(lifetime=600)
        await self.start(token=None, tokens=[expired, fresh])
        self.write_token(expired)
        client = self.client()
        with self.assertRaises(FTSCredentialsError) as caught:
            await client.submit(job("x"))
        self.assertIn("expired at", caught.exception.message)
        self.assertEqual(sum(self.fake.requests.values()), 0)
        self.write_token(fresh)
        await client.submit(job("x"))
        self.assertEqual(len(self.fake.jobs), 1)

    async def test_requests_are_bounded_and_bodies_read(self):
        """Many calls on one pool reuse connections: every answer body is read."""
        await self.start()
        client = self.client()
        for _ in range(20):
            await client.version()
        self.assertLessEqual(len(self.server._connections.lost), 2)


class X509ClientTests(ClientTestCase):
    """Client certificates over HTTPS, and the delegation flow before submitting."""

    async def start_tls(self, **options):
        self.pki = TestPKI.create(os.path.join(self.base, "pki"))
        await self.start(tls_options=self.pki.server_options(), auth="x509", token=None, **options)

    def x509_client(self, **options):
        options.setdefault("cert", self.pki.user_cert)
        options.setdefault("key", self.pki.user_key)
        options.setdefault("ca_path", self.pki.ca)
        return self.client(auth="x509", token_file=None, **options)

    async def test_delegates_before_the_first_submission_only(self):
        """The first submission delegates (whoami, view, request, PUT); later ones do not."""
        await self.start_tls()
        client = self.x509_client()
        who = await client.whoami()
        self.assertEqual(who["user_dn"], self.pki.user_dn)
        first = await client.submit(job("one"))
        self.assertEqual(first, deterministic_job_id(who["delegation_id"], "one"), "a VO without VOMS: the delegation id")
        self.assertEqual(self.fake.count("PUT", "/delegation/{id}/credential"), 1)
        self.assertEqual(self.fake.count("GET", "/delegation/{id}/request"), 1)
        await client.submit(job("two"))
        self.assertEqual(self.fake.count("PUT", "/delegation/{id}/credential"), 1)
        self.assertEqual(self.fake.count("POST", "/jobs"), 2)
        credential = self.fake.credentials[who["delegation_id"]]
        self.assertGreater(credential["termination_time"] - reactor.seconds(), 6 * 3600)

    async def test_existing_delegation_is_reused(self):
        """A new client finding a long-lived delegation at FTS does not delegate again."""
        await self.start_tls()
        await self.x509_client().submit(job("one"))
        await self.x509_client().submit(job("two"))
        self.assertEqual(self.fake.count("PUT", "/delegation/{id}/credential"), 1)
        self.assertEqual(self.fake.count("GET", "/delegation/{id}"), 2)

    async def test_419_delegates_again_and_retries_once(self):
        """When FTS answers 419 (its copy is expiring), the client delegates again and the retry succeeds."""
        await self.start_tls()
        client = self.x509_client()
        await client.submit(job("one"))
        self.fake.expire_credentials(left=60)
        await client.submit(job("two"))
        self.assertEqual(self.fake.count("POST", "/jobs"), 3)
        self.assertEqual(self.fake.count("PUT", "/delegation/{id}/credential"), 2)
        self.assertEqual(len(self.fake.jobs), 2)

    async def test_proxy_file_and_hashed_ca_directory(self):
        """A grid proxy file (proxy, key, user certificate) authenticates; CAs come from a hashed directory."""
        from transferd.fts import delegation

        await self.start_tls()
        # A proxy of the user's certificate, as voms-proxy-init writes it.
        user_pem = _read(self.pki.user_cert)
        user_key = _read(self.pki.user_key)
        request, request_key = delegation.new_proxy_request()
        proxy_chain = delegation.sign_proxy_request(request, user_pem, user_key, lifetime_seconds=86400)
        proxy_cert, rest = proxy_chain.split(b"-----END CERTIFICATE-----\n", 1)
        proxy_path = os.path.join(self.base, "x509up")
        with open(proxy_path, "wb") as handle:
            handle.write(proxy_cert + b"-----END CERTIFICATE-----\n" + request_key + rest)
        ca_dir = os.path.join(self.base, "certificates")
        os.makedirs(ca_dir)
        shutil.copy(self.pki.ca, os.path.join(ca_dir, "0a1b2c3d.0"))
        with open(os.path.join(ca_dir, "0a1b2c3d.signing_policy"), "w") as handle:
            handle.write("not a certificate\n")
        load_trust_root(ca_dir)
        client = FTSClient(self.server.url, reactor, reactor, auth="x509", proxy=proxy_path, ca_path=ca_dir,
                           request_timeout=5)
        self.addCleanup(client.stop)
        who = await client.whoami()
        self.assertEqual(who["user_dn"], self.pki.user_dn, "the identity is the user, not the proxy")
        await client.submit(job("via-proxy"))
        self.assertEqual(self.fake.count("PUT", "/delegation/{id}/credential"), 1)

    async def test_wrong_ca_is_unavailable(self):
        """A server certificate our CAs do not vouch for fails the call as FTSUnavailable."""
        await self.start_tls()
        other = TestPKI.create(os.path.join(self.base, "other-pki"))
        client = self.x509_client(ca_path=other.ca)
        with self.assertRaises(FTSUnavailable):
            await client.whoami()

    async def test_unreadable_credential(self):
        """A missing certificate file is an FTSCredentialsError naming it."""
        await self.start_tls()
        client = self.x509_client(cert=os.path.join(self.base, "missing.pem"))
        with self.assertRaises(FTSCredentialsError) as caught:
            await client.whoami()
        self.assertIn("missing.pem", caught.exception.message)

