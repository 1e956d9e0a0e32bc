"""The fake FTS3 speaks FTS3's REST API as fts-rest-flask does, over real HTTP on loopback."""

import json
import os
import uuid
import zlib

import treq
from twisted.internet import defer, reactor, ssl, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from transferd.testing.fakefts import FakeFTSServer, Options, Rule, TestPKI, makeService, route_of
from transferd.testing.tokens import TokenIssuer
from tests.support import wait_for

TOKEN = "s3cret-token"
# uuid5(uuid5(01874efb-4735-4595-bc9c-591aef8240c9, "transferd"), "sid-1"), worked out once.
KNOWN_ID = "00d09b8b-753d-508d-b69a-0d6c470eef9b"


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


def _known_id(vo, sid):
    return str(uuid.uuid5(uuid.uuid5(uuid.UUID("01874efb-4735-4595-bc9c-591aef8240c9"), vo), sid))


class FakeFTSTestCase(unittest.TestCase):
    timeout = 30

    async def start(self, tls_options=None, agent=None, **options):
        options.setdefault("token", TOKEN)
        self.server = FakeFTSServer(reactor, tls_options=tls_options, **options)
        await self.server.start()
        self.addCleanup(self.server.stop)
        self.fake = self.server.fake
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(agent or Agent(reactor, pool=self.pool))
        return self.server

    async def call(self, method, path, body=None, token=TOKEN, data=None):
        """(status, decoded JSON or raw bytes) of one request."""
        headers = {b"Accept": [b"application/json"]}
        if token:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        if body is not None:
            data = json.dumps(body).encode()
            headers[b"Content-Type"] = [b"application/json"]
        response = await self.http.request(method, self.server.url + path, headers=headers, data=data)
        content = await response.content()
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    @staticmethod
    def job(sid="sid-1", files=None, **params):
        files = files or [{"sources": ["gsiftp://src.example.org/staged/p"],
                           "destinations": ["gsiftp://dst.example.org/deliveries/p"], "filesize": 3}]
        return {"files": files, "params": dict({"id_generator": "deterministic", "sid": sid}, **params)}

    async def wait_state(self, job_id, states=("FINISHED", "FAILED", "FINISHEDDIRTY", "CANCELED")):
        async def ended():
            code, body = await self.call("GET", f"/jobs/{job_id}?files=file_state,reason")
            return body if code == 200 and body["job_state"] in states else None

        return await wait_for(lambda: defer.Deferred.fromCoroutine(ended()), 10)


class ProtocolTests(FakeFTSTestCase):
    async def test_version_and_whoami(self):
        """GET / gives FTS's api version 3.13.4; /whoami the VO (the token issuer's host name), its id and FTS's base id."""
        await self.start()
        code, body = await self.call("GET", "/")
        self.assertEqual((code, body["api"]), (200, {"major": 3, "minor": 13, "patch": 4}))
        code, who = await self.call("GET", "/whoami")
        self.assertEqual(code, 200)
        self.assertEqual(who["vos"], ["iam.example.org"])
        self.assertEqual(who["base_id"], "01874efb-4735-4595-bc9c-591aef8240c9")
        self.assertEqual(who["vos_id"], [str(uuid.uuid5(uuid.UUID(who["base_id"]), "iam.example.org"))])
        self.assertEqual(who["method"], "oauth2")

    async def test_configured_vo_and_a_jwts_issuer(self):
        """A VO given to the fake is every user's; without one, a JWT's VO is its issuer's host name."""
        issuer = TokenIssuer("https://wlcg.cern.example:8443/")
        token = issuer.token(sub="robot")
        await self.start(tokens=[TOKEN, token])
        code, who = await self.call("GET", "/whoami", token=token)
        self.assertEqual((who["vos"], who["user_dn"]), (["wlcg.cern.example"], "robot"))
        self.fake.vo = "myvo"
        self.assertEqual((await self.call("GET", "/whoami"))[1]["vos"], ["myvo"])

    async def test_bad_missing_or_expired_token_is_anonymous(self):
        """A wrong, missing or expired token makes the caller anonymous: whoami 200, POST 403, GET and DELETE 500."""
        expired = TokenIssuer("https://iam.example.org/").token(lifetime=-10)
        await self.start(tokens=[TOKEN, expired], duration=60)
        known = (await self.call("POST", "/jobs", self.job("known")))[1]["job_id"]
        for token in (None, "wrong", expired):
            code, who = await self.call("GET", "/whoami", token=token)
            self.assertEqual((code, who["method"], who["user_dn"], who["vos"], who["delegation_id"]),
                             (200, "unauthenticated", "anon", [], None))
            code, body = await self.call("POST", "/jobs", self.job(), token=token)
            self.assertEqual((code, body), (403, {"status": "403 Forbidden", "message": "Not enough permissions"}))
            for method in ("GET", "DELETE"):
                code, body = await self.call(method, f"/jobs/{known}", token=token)
                self.assertEqual((code, body["status"]), (500, "500 Internal Server Error"), method)
        self.assertEqual(list(self.fake.jobs), [known])
        self.assertEqual(self.fake.jobs[known]["job_state"], "ACTIVE", "not cancelled")

    async def test_deterministic_id_and_duplicate(self):
        """A deterministic submission gets uuid5(uuid5(BASE_ID, vo), sid); the same sid again is 409."""
        await self.start()
        self.assertEqual(_known_id("transferd", "sid-1"), KNOWN_ID)
        code, body = await self.call("POST", "/jobs", self.job("sid-1"))
        self.assertEqual((code, body), (200, {"job_id": _known_id("iam.example.org", "sid-1")}))
        code, body = await self.call("POST", "/jobs", self.job("sid-1"))
        self.assertEqual(code, 409)
        self.assertIn("duplicated", body["message"])
        self.assertEqual(len(self.fake.jobs_for_sid("sid-1")), 1)
        self.assertEqual(self.fake.submissions["sid-1"], 1)

    async def test_standard_ids_differ(self):
        """Without id_generator each submission gets a new id."""
        await self.start()
        job = self.job()
        del job["params"]["id_generator"]
        ids = {(await self.call("POST", "/jobs", job))[1]["job_id"] for _ in range(2)}
        self.assertEqual(len(ids), 2)

    async def test_bad_bodies(self):
        """Bodies FTS would refuse answer 400 with FTS's message."""
        await self.start()
        cases = [
            (b"not json", "Badly formatted JSON"),
            ({"params": {}}, "No transfers operations specified"),
            ({"files": []}, "No valid pairs available"),
            ({"files": [{"destinations": ["gsiftp://h/p"]}]}, "Missing parameter: 'sources'"),
            (self.job(files=[{"sources": ["file:///etc/passwd"], "destinations": ["gsiftp://h/p"]}]),
             "Can not transfer local files"),
            (self.job(files=[{"sources": ["gsiftp:///no/host"], "destinations": ["gsiftp://h/p"]}]), "Missing host"),
            (self.job(files=[{"sources": ["gsiftp://h"], "destinations": ["gsiftp://h/p"]}]), "Missing path"),
            ({"files": [{"sources": ["gsiftp://h/a"], "destinations": ["gsiftp://h/b"]}],
              "params": {"id_generator": "deterministic"}}, "Need sid"),
        ]
        for body, message in cases:
            if isinstance(body, bytes):
                code, answer = await self.call("POST", "/jobs", data=body)
            else:
                code, answer = await self.call("POST", "/jobs", body)
            self.assertEqual(code, 400, body)
            self.assertIn(message, answer["message"])
        self.assertEqual(self.fake.jobs, {})

    async def test_null_params_take_defaults(self):
        """Parameters sent as null take FTS's defaults (as the official client sends them); deletions are 405."""
        await self.start()
        body = self.job("nulls", priority=None, retry=None, verify_checksum=None, overwrite=None, job_metadata=None)
        body["delete"] = None
        code, answer = await self.call("POST", "/jobs", body)
        self.assertEqual(code, 200, answer)
        job = self.fake.jobs[answer["job_id"]]
        self.assertEqual((job["priority"], job["retry"], job["overwrite_flag"]), (3, 0, False))
        body = self.job("deletion")
        body["delete"] = [{"surl": "gsiftp://h/p"}]
        self.assertEqual((await self.call("POST", "/jobs", body))[0], 405)

    async def test_single_bulk_and_multistatus(self):
        """One id answers 200 or 404; several answer a list, 207 when some are unknown."""
        await self.start()
        first = (await self.call("POST", "/jobs", self.job("a")))[1]["job_id"]
        second = (await self.call("POST", "/jobs", self.job("b")))[1]["job_id"]
        code, body = await self.call("GET", f"/jobs/{first}")
        self.assertEqual((code, body["job_id"], body["http_status"]), (200, first, "200 Ok"))
        self.assertNotIn("files", body)
        code, body = await self.call("GET", f"/jobs/{first},{second}?files=file_state,dest_surl")
        self.assertEqual(code, 200)
        self.assertEqual([entry["job_id"] for entry in body], [first, second])
        self.assertEqual(set(body[0]["files"][0]), {"file_state", "dest_surl"})
        unknown = str(uuid.uuid4())
        code, body = await self.call("GET", f"/jobs/{first},{unknown}")
        self.assertEqual(code, 207)
        self.assertEqual([entry["http_status"] for entry in body], ["200 Ok", "404 Not Found"])
        self.assertIn(unknown, body[1]["http_message"])
        code, body = await self.call("GET", f"/jobs/{unknown}")
        self.assertEqual((code, body["http_status"]), (404, "404 Not Found"))
        code, files = await self.call("GET", f"/jobs/{first}/files")
        self.assertEqual((code, len(files), files[0]["dest_surl"]), (200, 1, "gsiftp://dst.example.org/deliveries/p"))
        self.assertEqual((await self.call("GET", f"/jobs/{unknown}/files"))[0], 404)

    async def test_counts_requests_per_endpoint(self):
        """Requests are counted per endpoint, and /_fake/state shows them with every job and its sid."""
        await self.start()
        job_id = (await self.call("POST", "/jobs", self.job("a")))[1]["job_id"]
        await self.call("GET", f"/jobs/{job_id},{job_id}")
        await self.call("GET", f"/jobs/{job_id}")
        self.assertEqual(self.fake.count("POST", "/jobs"), 1)
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}"), 2)
        code, state = await self.call("GET", "/_fake/state")
        self.assertEqual(code, 200)
        self.assertEqual(state["requests"]["GET /jobs/{ids}"], 2)
        self.assertEqual([(job["job_id"], job["sid"]) for job in state["jobs"]], [(job_id, "a")])
        self.assertEqual(route_of("PUT", "/delegation/abc/credential"), "PUT /delegation/{id}/credential")

    async def test_cancel(self):
        """DELETE cancels an active job (200), answers 200 saying 304 for an ended one, and 404 for others."""
        await self.start(slow=["slow=30"])
        files = [{"sources": ["gsiftp://h/slow"], "destinations": ["gsiftp://d/slow"]}]
        job_id = (await self.call("POST", "/jobs", self.job("a", files)))[1]["job_id"]
        code, body = await self.call("DELETE", f"/jobs/{job_id}")
        self.assertEqual((code, body["job_state"], body["http_status"]), (200, "CANCELED", "200 Ok"))
        code, body = await self.call("GET", f"/jobs/{job_id}?files=file_state,reason")
        self.assertEqual(body["files"][0], {"file_state": "CANCELED", "reason": "Job canceled by the user"})
        code, body = await self.call("DELETE", f"/jobs/{job_id}")
        self.assertEqual((code, body["job_state"], body["http_status"]), (200, "CANCELED", "304 Not Modified"))
        self.assertEqual((await self.call("DELETE", f"/jobs/{uuid.uuid4()}"))[0], 404)
        self.fake.cancel_ended_http_304 = True
        self.assertEqual(await self.call("DELETE", f"/jobs/{job_id}"), (304, b""))

    async def test_paths_too_long_for_apache(self):
        """A GET of 109 job ids answers; 110 get Apache's HTML 404, as FTS behind Apache does."""
        await self.start()
        ids = [str(uuid.uuid4()) for _ in range(110)]
        code, body = await self.call("GET", "/jobs/" + ",".join(ids[:109]))
        self.assertEqual((code, len(body)), (207, 109))
        code, body = await self.call("GET", "/jobs/" + ",".join(ids))
        self.assertEqual(code, 404)
        self.assertIn(b"<title>404 Not Found</title>", body)
        self.assertEqual(self.fake.count("GET", "/jobs/{ids}"), 1)

    async def test_token_files_start_in_token_prep_and_sizes_come_at_the_end(self):
        """A token submission's files start TOKEN_PREP with filesize null; the size is there once the file ends."""
        clock = task.Clock()
        await self.start(clock=clock, duration=5)
        files = [{"sources": ["gsiftp://h/p"], "destinations": ["gsiftp://d/p"], "filesize": 42}]
        job_id = (await self.call("POST", "/jobs", self.job("t", files)))[1]["job_id"]
        code, (entry,) = await self.call("GET", f"/jobs/{job_id}/files")
        self.assertEqual((entry["file_state"], entry["filesize"], entry["user_filesize"]), ("TOKEN_PREP", None, 42))
        clock.advance(1)
        self.assertEqual([(f["file_state"], f["filesize"]) for f in (await self.call("GET", f"/jobs/{job_id}/files"))[1]],
                         [("ACTIVE", None)])
        clock.advance(5)
        code, (entry,) = await self.call("GET", f"/jobs/{job_id}/files")
        self.assertEqual((entry["file_state"], entry["filesize"]), ("FINISHED", 42))


class OutcomeTests(FakeFTSTestCase):
    def files(self, *names):
        return [{"sources": [f"gsiftp://src/staged/{name}"], "destinations": [f"gsiftp://dst/out/{name}"]}
                for name in names]

    async def test_rules_decide_outcomes(self):
        """Rules make files FAILED or CANCELED; the job ends FAILED, FINISHEDDIRTY, CANCELED or FINISHED."""
        await self.start(fail=["bad=FAILED:SOURCE [2] no such file", "stop=CANCELED"], duration=0.01)
        cases = {
            "ok": (self.files("ok1", "ok2"), "FINISHED"),
            "failed": (self.files("bad1"), "FAILED"),
            "dirty": (self.files("ok3", "bad2"), "FINISHEDDIRTY"),
            "cancelled": (self.files("ok4", "stop1"), "CANCELED"),
        }
        for sid, (files, expected) in cases.items():
            job_id = (await self.call("POST", "/jobs", self.job(sid, files)))[1]["job_id"]
            job = await self.wait_state(job_id)
            self.assertEqual(job["job_state"], expected, sid)
            if expected in ("FAILED", "FINISHEDDIRTY"):
                self.assertIn("One or more files failed", job["reason"])
                failed = [f for f in job["files"] if f["file_state"] == "FAILED"]
                self.assertEqual(failed[0]["reason"], "SOURCE [2] no such file")

    async def test_lost_job(self):
        """A LOST rule makes the fake forget the job when it ends: GET answers 404."""
        await self.start(fail=["gone=LOST"], duration=0.01)
        job_id = (await self.call("POST", "/jobs", self.job("x", self.files("gone"))))[1]["job_id"]

        async def forgotten():
            return (await self.call("GET", f"/jobs/{job_id}"))[0] == 404

        await wait_for(lambda: defer.Deferred.fromCoroutine(forgotten()), 10)
        self.assertIn(job_id, self.fake.lost)

    async def test_slow_rule_and_state_progress(self):
        """A file runs ACTIVE until its duration has passed."""
        await self.start(slow=["slow=30"])
        job_id = (await self.call("POST", "/jobs", self.job("x", self.files("slow"))))[1]["job_id"]
        await self.wait_state(job_id, states=("ACTIVE",))

    def test_rule_syntax(self):
        """Rules parse from PATTERN=OUTCOME[:REASON] and PATTERN=SECONDS; mistakes are refused."""
        self.assertEqual(Rule.failure("p=failed:why: really"), Rule("p", "FAILED", "why: really"))
        self.assertEqual(Rule.slowness("p=2.5"), Rule("p", duration=2.5))
        for text in ("p", "p=EXPLODED", "=FAILED"):
            self.assertRaises(ValueError, Rule.failure, text)
        self.assertRaises(ValueError, Rule.slowness, "p=soon")


class CopyTests(FakeFTSTestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.base, "staged", "prod", "sub"))
        self.data = {"prod/a": os.urandom(5000), "prod/sub/b": os.urandom(7000)}
        for name, data in self.data.items():
            with open(os.path.join(self.base, "staged", name), "wb") as handle:
                handle.write(data)

    def files(self, names=("prod/a", "prod/sub/b"), checksum=None):
        files = []
        for name in names:
            entry = {"sources": [f"gsiftp://stager.example.org{self.base}/staged/{name}"],
                     "destinations": [f"davs://dest.example.org{self.base}/out/{name}"]}
            if checksum is not None:
                entry["checksum"] = checksum(name)
            files.append(entry)
        return files

    async def test_copies_bytes(self):
        """With copy on, FINISHED files are copied between the local paths of their URLs, byte for byte."""
        await self.start(copy=True, duration=0)
        adler = lambda name: "adler32:%08x" % zlib.adler32(self.data[name])  # noqa: E731
        job_id = (await self.call("POST", "/jobs", self.job("c", self.files(checksum=adler),
                                                            verify_checksum="both")))[1]["job_id"]
        job = await self.wait_state(job_id)
        self.assertEqual(job["job_state"], "FINISHED", job)
        for name, data in self.data.items():
            with open(os.path.join(self.base, "out", name), "rb") as handle:
                self.assertEqual(handle.read(), data)

    async def test_copy_failures(self):
        """A missing source, an existing destination (no overwrite) or a wrong checksum fail the file."""
        await self.start(copy=True, duration=0)
        os.makedirs(os.path.join(self.base, "out", "prod"))
        with open(os.path.join(self.base, "out", "prod", "a"), "wb") as handle:
            handle.write(b"already here")
        job_id = (await self.call("POST", "/jobs", self.job("exists", self.files(["prod/a"]))))[1]["job_id"]
        job = await self.wait_state(job_id)
        self.assertIn("Destination file exists", job["files"][0]["reason"])
        job_id = (await self.call("POST", "/jobs", self.job("overwrite", self.files(["prod/a"]),
                                                            overwrite=True)))[1]["job_id"]
        self.assertEqual((await self.wait_state(job_id))["job_state"], "FINISHED")
        job_id = (await self.call("POST", "/jobs", self.job("missing", self.files(["prod/none"]))))[1]["job_id"]
        self.assertIn("No such file", (await self.wait_state(job_id))["files"][0]["reason"])
        job_id = (await self.call("POST", "/jobs", self.job(
            "checksum", self.files(["prod/sub/b"], checksum=lambda name: "adler32:00000001"),
            verify_checksum="both")))[1]["job_id"]
        job = await self.wait_state(job_id)
        self.assertEqual(job["job_state"], "FAILED")
        self.assertIn("CHECKSUM MISMATCH", job["files"][0]["reason"])
        self.assertFalse(os.path.exists(os.path.join(self.base, "out", "prod", "sub", "b")))


class X509Tests(FakeFTSTestCase):
    """HTTPS with client certificates: identity from the certificate, delegation as FTS does it."""

    async def start_tls(self, with_certificate=True, **options):
        self.pki = TestPKI.create(os.path.abspath(self.mktemp()))
        client_cert = ssl.PrivateCertificate.loadPEM(_read(self.pki.user_cert)
                                                     + _read(self.pki.user_key))
        ca = ssl.Certificate.loadPEM(_read(self.pki.ca))
        credential = {"clientCertificate": client_cert} if with_certificate else {}

        class Policy:
            def creatorForNetloc(self, hostname, port):
                return ssl.optionsForClientTLS(hostname.decode(), trustRoot=ca, **credential)

        from zope.interface import directlyProvides
        from twisted.web.iweb import IPolicyForHTTPS

        policy = Policy()
        directlyProvides(policy, IPolicyForHTTPS)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        options.setdefault("token", None)
        await self.start(tls_options=self.pki.server_options(), auth="x509",
                         agent=Agent(reactor, contextFactory=policy, pool=pool), **options)

    async def test_client_certificates_are_optional(self):
        """Over HTTPS a client without a certificate gets through the handshake: with a token it is that user, else anonymous."""
        await self.start_tls(with_certificate=False, token=TOKEN)
        self.assertEqual((await self.call("GET", "/whoami"))[1]["method"], "oauth2")
        self.assertEqual((await self.call("GET", "/whoami", token=None))[1]["method"], "unauthenticated")

    async def test_identity_and_delegation(self):
        """The DN comes from the certificate; submitting needs a delegated proxy (419), which the PUT provides."""
        from transferd.fts import delegation

        await self.start_tls()
        code, who = await self.call("GET", "/whoami", token=None)
        self.assertEqual(code, 200, who)
        self.assertEqual(who["user_dn"], self.pki.user_dn)
        self.assertEqual(who["method"], "certificate")
        dlg = who["delegation_id"]
        self.assertEqual(len(dlg), 16)
        self.assertEqual((await self.call("GET", f"/delegation/{dlg}", token=None)), (200, None))
        code, body = await self.call("POST", "/jobs", self.job(), token=None)
        self.assertEqual(code, 419)
        self.assertIn("No delegation found", body["message"])
        self.assertEqual((await self.call("GET", "/delegation/0123456789abcdef", token=None))[0], 403)
        code, csr = await self.call("GET", f"/delegation/{dlg}/request", token=None)
        self.assertEqual(code, 200)
        self.assertIn(b"CERTIFICATE REQUEST", csr)
        cert, key = _read(self.pki.user_cert), _read(self.pki.user_key)
        code, body = await self.call("PUT", f"/delegation/{dlg}/credential", token=None, data=cert)
        self.assertEqual(code, 400)
        self.assertIn("Could not process the proxy", body["message"])
        proxy = delegation.sign_proxy_request(csr, cert, key, lifetime_seconds=7200)
        code, _ = await self.call("PUT", f"/delegation/{dlg}/credential", token=None, data=proxy)
        self.assertEqual(code, 201)
        code, info = await self.call("GET", f"/delegation/{dlg}", token=None)
        self.assertTrue(info["termination_time"])
        self.assertEqual(info["voms_attrs"], [""], "no VOMS attributes, as FTS shows them")
        self.assertEqual(who["vos"], [dlg])
        code, body = await self.call("POST", "/jobs", self.job(), token=None)
        self.assertEqual((code, body), (200, {"job_id": _known_id(dlg, "sid-1")}), "the VO is the delegation id")
        self.fake.expire_credentials(left=600)
        code, body = await self.call("POST", "/jobs", self.job("sid-2"), token=None)
        self.assertEqual(code, 419)
        self.assertIn("less than one hour", body["message"])


    async def test_alpn_clients(self):
        """Clients offering ALPN (requests, curl) complete the handshake: the fake answers http/1.1."""
        import socket
        import ssl as stdlib_ssl

        from twisted.internet import threads

        await self.start_tls()

        def fetch():
            context = stdlib_ssl.create_default_context(cafile=self.pki.ca)
            context.load_cert_chain(self.pki.user_cert, self.pki.user_key)
            context.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(("127.0.0.1", self.server.port_number), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"GET /whoami HTTP/1.0\r\n\r\n")
                    return tls.selected_alpn_protocol(), tls.recv(12)

        self.assertEqual(await threads.deferToThread(fetch), ("http/1.1", b"HTTP/1.0 200"))


class PluginTests(unittest.TestCase):
    def test_options_and_service(self):
        """`twistd transferd-fakefts` options build a listening service around a configured fake."""
        options = Options()
        options.parseOptions(["--endpoint", "tcp:0:interface=127.0.0.1", "--copy", "--duration", "0.1",
                              "--token", "a", "--token", "b", "--fail", "x=FAILED:why", "--slow", "y=3",
                              "--submit-delay", "2", "--cancel-ended-http-304"])
        service = makeService(options)
        fake = service.fake
        self.assertEqual((fake.tokens, fake.copy, fake.duration, fake.submit_delay), ({"a", "b"}, True, 0.1, 2.0))
        self.assertEqual((fake.vo, fake.cancel_ended_http_304), (None, True))
        self.assertEqual(fake.rules, [Rule("x", "FAILED", "why"), Rule("y", duration=3.0)])
        from twisted.python import usage

        self.assertRaises(usage.UsageError, Options().parseOptions, ["--fail", "nonsense"])
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--client-ca", "ca.pem"])
