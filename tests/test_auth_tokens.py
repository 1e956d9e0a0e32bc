"""Bearer tokens (WLCG JWT profile): TokenVerifier against transferd.testing.tokens' issuer.

JWKS come from files, or from a JWKS server on 127.0.0.1 in this process over
real HTTP; the verifier's timers run on a Clock.
"""

import json
import os
import time

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import defer, reactor, task
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from transferd.auth.tokens import (FETCH_TIMEOUT, LEEWAY, MAX_JWKS_BYTES, REFETCH_INTERVAL, JWKSError, TokenError,
                                   TokenVerifier, TrustedIssuer, parse_jwks)
from transferd.testing.tokens import AUDIENCE, JWKSServer, TokenIssuer, compact

ISS_A = "https://idp-a.example.org"
ISS_B = "https://idp-b.example.org"
REFRESH = 3600.0


class VerifierTestCase(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.clock = task.Clock()
        self.events = []
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.tokens_shown = []  # every token handed to verify(), to check that no log line holds one
        self.addCleanup(self.check_logs_hold_no_token)

    def jwks_file(self, issuer, name=None):
        path = os.path.join(self.directory, name or "jwks-" + issuer.kid + ".json")
        issuer.write_jwks(path)
        return path

    def start(self, issuers, audiences=(AUDIENCE,)):
        verifier = TokenVerifier(issuers, audiences, reactor, self.clock, refresh=REFRESH)
        verifier.log = Logger(namespace="tokens", observer=self.events.append)
        verifier.startService()
        self.addCleanup(verifier.stopService)
        return verifier

    async def accepted(self, verifier, token):
        self.tokens_shown.append(token)
        return await verifier.verify(token)

    async def refused(self, verifier, token, expected):
        """Assert that verifier refuses token with a message holding expected (and not the token)."""
        self.tokens_shown.append(token)
        try:
            identity = await verifier.verify(token)
        except TokenError as error:
            message = str(error)
        else:
            self.fail(f"the token was accepted as {identity}")
        self.assertIn(expected, message)
        for secret in (token, str(token).rsplit(".", 1)[-1]):
            if len(secret) >= 16:
                self.assertNotIn(secret, message)
        return message

    def logged(self):
        return [formatEvent(event) for event in self.events]

    def check_logs_hold_no_token(self):
        for line in self.logged():
            for token in self.tokens_shown:
                if len(token) >= 16:
                    self.assertNotIn(str(token), line)


class FileJWKSTests(VerifierTestCase):
    def setUp(self):
        super().setUp()
        self.a = TokenIssuer(ISS_A, "rsa")
        self.b = TokenIssuer(ISS_B, "ec")
        self.path_a = self.jwks_file(self.a)
        self.verifier = self.start({ISS_A: self.path_a, ISS_B: self.jwks_file(self.b)})

    async def test_valid_rs256_token(self):
        """When a trusted issuer's RS256 token is valid, verify() gives its (iss, sub)."""
        identity = await self.accepted(self.verifier, self.a.token(sub="alice"))
        self.assertEqual(identity, (ISS_A, "alice"))
        self.assertEqual((identity.iss, identity.sub), (ISS_A, "alice"))

    async def test_valid_es256_token(self):
        """When a trusted issuer's ES256 token is valid, verify() gives its (iss, sub)."""
        self.assertEqual(await self.accepted(self.verifier, self.b.token(sub="bob")), (ISS_B, "bob"))

    async def test_keys_are_logged_at_start(self):
        """When the service starts, each JWKS file is read at once and its keys logged."""
        logged = "\n".join(self.logged())
        self.assertIn(f"token issuer {ISS_A}: 1 signing keys loaded", logged)
        self.assertIn(self.b.kid, logged)

    async def test_bad_signature(self):
        """When the claims are changed after signing, the signature does not verify."""
        await self.refused(self.verifier, self.a.tampered_token(), "the token's signature does not verify")
        await self.refused(self.verifier, self.b.tampered_token(), "the token's signature does not verify")

    async def test_key_not_in_jwks(self):
        """When a token is signed by a key the issuer does not publish (even under a published kid), it is refused."""
        impostor = TokenIssuer(ISS_A, "rsa", kid=self.a.kid)
        await self.refused(self.verifier, impostor.token(), "the token's signature does not verify")
        stranger = TokenIssuer(ISS_A, "rsa")
        await self.refused(self.verifier, stranger.token(),
                           f"the token's key {stranger.kid} is not among the keys of issuer {ISS_A}")

    async def test_untrusted_issuer(self):
        """When the token's issuer is not configured, the token is refused, naming the issuer."""
        evil = TokenIssuer("https://evil.example.org", "ec")
        await self.refused(self.verifier, evil.token(), "the token's issuer https://evil.example.org is not trusted")

    async def test_key_of_another_issuer(self):
        """When a token claims issuer B but is signed with issuer A's key, it is refused."""
        await self.refused(self.verifier, self.a.token(extra={"iss": ISS_B}),
                           f"the token's key {self.a.kid} is not among the keys of issuer {ISS_B}")
        a_under_b_kid = TokenIssuer(ISS_A, "ec", kid=self.b.kid)
        await self.refused(self.verifier, a_under_b_kid.token(extra={"iss": ISS_B}),
                           "the token's signature does not verify")

    async def test_wrong_audience(self):
        """When the token's audience is another service, it is refused, naming the audiences accepted here."""
        message = await self.refused(self.verifier, self.a.token(aud="https://other.example.org"),
                                     "the token's audience does not include this service")
        self.assertIn(AUDIENCE, message)

    async def test_one_of_several_audiences(self):
        """When the token names one of the configured audiences (string or list), it is accepted."""
        verifier = self.start({ISS_A: self.jwks_file(self.a)}, audiences=(AUDIENCE, "https://redirector.example.org"))
        for aud in ("https://redirector.example.org", ["https://other.example.org", "https://redirector.example.org"]):
            self.assertEqual(await self.accepted(verifier, self.a.token(aud=aud)), (ISS_A, "alice"))

    async def test_expired(self):
        """When exp has passed by more than LEEWAY, the token is refused; within LEEWAY it is accepted."""
        now = time.time()
        await self.refused(self.verifier, self.a.token(now=now - 3600, lifetime=600), "the bearer token has expired")
        await self.refused(self.verifier, self.a.token(now=now - 600 - 2 * LEEWAY, lifetime=600),
                           "the bearer token has expired")
        self.assertEqual(await self.accepted(self.verifier, self.a.token(now=now - 600 - LEEWAY / 2, lifetime=600)),
                         (ISS_A, "alice"))

    async def test_not_valid_yet(self):
        """When nbf is further in the future than LEEWAY, the token is refused; within LEEWAY it is accepted."""
        now = time.time()
        await self.refused(self.verifier, self.a.token(extra={"nbf": int(now + 5 * LEEWAY)}),
                           "the bearer token is not valid yet")
        self.assertEqual(await self.accepted(self.verifier, self.a.token(extra={"nbf": int(now + LEEWAY / 2)})),
                         (ISS_A, "alice"))

    async def test_hs256_keyed_with_the_public_key(self):
        """When a token is HS256 with the issuer's public key PEM as secret (alg confusion), it is refused."""
        await self.refused(self.verifier, self.a.hs256_token(),
                           "the token is signed with HS256; only RS256 and ES256 are accepted")

    async def test_alg_none(self):
        """When a token is unsigned (alg none), it is refused."""
        await self.refused(self.verifier, self.a.none_token(), "the token is signed with none; only RS256 and ES256")

    async def test_other_asymmetric_algorithm(self):
        """When a token uses an algorithm outside the profile (RS512), it is refused before any key is used."""
        header, claims = self.a.header("RS512"), self.a.claims()
        await self.refused(self.verifier, compact(header, claims, b"x" * 256), "the token is signed with RS512")

    async def test_garbage(self):
        """When the bearer token is not a JWT, it is refused with a message saying so."""
        cases = [
            ("", "not a JWT"),
            ("hello", "not a JWT"),
            ("a.b.c.d", "not a JWT"),
            ("a.b.c", "not a well-formed JWT"),
            ("!!!.???.***", "not a well-formed JWT"),
            ("e30.e30.", "names no signing algorithm"),  # {} . {}
            ("x" * 20000, "longer than 16384 characters"),
            (b"a.b.c", "must be text"),
        ]
        for token, expected in cases:
            await self.refused(self.verifier, token, expected)

    async def test_key_type_must_fit_the_algorithm(self):
        """When the header says ES256 but its kid names an RSA key, the token is refused."""
        forged = compact(self.a.header("ES256"), self.a.claims(), b"x" * 64)
        await self.refused(self.verifier, forged, f"the key {self.a.kid} of issuer {ISS_A} is not an ES256 key")

    async def test_token_without_kid_refused(self):
        """When a token has no kid and its issuer is not configured to allow that, it is refused naming the profile."""
        await self.refused(self.verifier, self.a.token(headers={"kid": None}),
                           f"the token names no key (kid), which the WLCG token profile requires; issuer {ISS_A}")

    async def test_token_without_kid_where_allowed(self):
        """When the issuer is trusted kid-optional, a token without kid is verified by its only key of that type."""
        verifier = self.start({ISS_A: TrustedIssuer(self.jwks_file(self.a), kid_optional=True),
                               ISS_B: TrustedIssuer(self.jwks_file(self.b))})
        self.assertEqual(await self.accepted(verifier, self.a.token(headers={"kid": None})), (ISS_A, "alice"))
        await self.refused(verifier, self.b.token(headers={"kid": None}, extra={"iss": ISS_A}),
                           f"issuer {ISS_A} has no ES256 key")
        await self.refused(verifier, self.b.token(headers={"kid": None}), "the token names no key (kid)")
        second = TokenIssuer(ISS_A, "rsa")
        path = os.path.join(self.directory, "two.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"keys": [self.a.jwk(), second.jwk()]}, handle)
        verifier = self.start({ISS_A: TrustedIssuer(path, kid_optional=True)})
        await self.refused(verifier, second.token(headers={"kid": None}),
                           f"the token names no key (kid) and issuer {ISS_A} has several RS256 keys")
        self.assertEqual(await self.accepted(verifier, second.token()), (ISS_A, "alice"))

    async def test_required_claims(self):
        """When exp, sub or aud is missing, or sub is empty, the token is refused naming the claim."""
        for claim in ("exp", "sub", "aud"):
            await self.refused(self.verifier, self.a.token(extra={claim: None}), f"the token has no {claim} claim")
        await self.refused(self.verifier, self.a.token(sub=""), "the token's subject (sub) is empty")
        await self.refused(self.verifier, self.a.token(extra={"iss": None}), "the token names no issuer (iss)")

    async def test_optional_claims(self):
        """When iat, nbf, jti and wlcg.ver are absent (a plain OIDC token), the token is accepted."""
        token = self.a.token(extra={"iat": None, "nbf": None, "jti": None, "wlcg.ver": None})
        self.assertEqual(await self.accepted(self.verifier, token), (ISS_A, "alice"))

    async def test_wlcg_version(self):
        """When wlcg.ver is 1.x the token is accepted; another major version is refused."""
        self.assertEqual(await self.accepted(self.verifier, self.a.token(extra={"wlcg.ver": "1.3"})), (ISS_A, "alice"))
        await self.refused(self.verifier, self.a.token(extra={"wlcg.ver": "2.0"}),
                           "the token follows WLCG profile version 2.0; only 1.x is understood")

    async def test_file_rotation(self):
        """When the JWKS file is replaced (key rotation), new tokens are accepted and old ones refused at once."""
        old = self.a.token()
        self.assertEqual(await self.accepted(self.verifier, old), (ISS_A, "alice"))
        old_kid = self.a.kid
        self.a.rotate()
        self.a.write_jwks(self.path_a)
        self.assertEqual(await self.accepted(self.verifier, self.a.token(sub="carol")), (ISS_A, "carol"))
        await self.refused(self.verifier, old, f"the token's key {old_kid} is not among the keys of issuer {ISS_A}")

    async def test_broken_file_keeps_last_good_keys(self):
        """When the JWKS file is replaced by something unusable, the last good keys stay and it is logged once."""
        with open(self.path_a, "w", encoding="utf-8") as handle:
            handle.write('{"keys": "none"}')
        for _ in range(3):
            self.assertEqual(await self.accepted(self.verifier, self.a.token()), (ISS_A, "alice"))
        warnings = [line for line in self.logged() if "not a JSON object" in line]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("keeping the 1 keys loaded before", warnings[0])

    async def test_missing_file(self):
        """When the JWKS file does not exist yet, tokens are refused clearly, and accepted once it appears."""
        path = os.path.join(self.directory, "later.json")
        verifier = self.start({ISS_A: path})
        await self.refused(verifier, self.a.token(), f"the keys of issuer {ISS_A} are not available yet")
        self.assertTrue(any("cannot read" in line and path in line for line in self.logged()))
        self.a.write_jwks(path)
        self.assertEqual(await self.accepted(verifier, self.a.token()), (ISS_A, "alice"))

    async def test_messages_never_hold_the_token(self):
        """When a token is refused for any reason, neither the message nor the log holds any part of it."""
        stranger = TokenIssuer("https://evil.example.org", "rsa")
        tokens = [self.a.tampered_token(), self.a.hs256_token(), self.a.none_token(), stranger.token(),
                  self.a.token(aud="https://other.example.org"), self.a.token(now=0), self.b.token(extra={"iss": ISS_A})]
        for token in tokens:
            self.tokens_shown.append(token)
            with self.assertRaises(TokenError) as refused:
                await self.verifier.verify(token)
            for part in token.split("."):
                if part:
                    self.assertNotIn(part, str(refused.exception))
                    self.assertFalse([line for line in self.logged() if part in line])

    def test_needs_an_audience(self):
        """When no audience is configured, the verifier cannot be built: every token would be refused."""
        self.assertRaises(ValueError, TokenVerifier, {ISS_A: "/nonexistent"}, (), reactor, self.clock)


class JWKSParsingTests(unittest.SynchronousTestCase):
    def test_only_rs256_and_es256_signing_keys_are_used(self):
        """When a JWKS holds other keys (short RSA, other curves, HMAC, encryption, private), they are ignored."""
        good = TokenIssuer(ISS_A, "rsa").jwk()
        short = RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 1024).public_key(), as_dict=True)
        p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
        private = RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048), as_dict=True)
        document = {"keys": [
            dict(short, kid="short"), dict(p384, kid="p384"), {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            dict(good, kid="enc", use="enc"), dict(good, kid="rs512", alg="RS512"), dict(private, kid="private"),
            dict(good, kid=7), {"kty": "RSA", "kid": "broken", "n": "!", "e": "AQAB"}, "junk", good,
        ]}
        keys = parse_jwks(json.dumps(document).encode())
        self.assertEqual([(key.key_id, key.algorithm_name) for key in keys], [(good["kid"], "RS256")])

    def test_unusable_documents(self):
        """When a JWKS is not JSON, has no "keys" list, or no usable key, parse_jwks says which."""
        cases = [
            (b"<html>", "not JSON"),
            (b"[]", 'not a JSON object with a "keys" list'),
            (b'{"keys": {}}', 'not a JSON object with a "keys" list'),
            (b'{"keys": []}', "holds no RS256 or ES256 signing key"),
        ]
        for data, expected in cases:
            with self.assertRaises(JWKSError) as raised:
                parse_jwks(data)
            self.assertIn(expected, str(raised.exception))


class URLJWKSTests(VerifierTestCase):
    async def serve(self, issuer):
        server = JWKSServer(issuer, reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server

    async def test_fetched_without_blocking(self):
        """When the JWKS is a URL, it is fetched asynchronously: the server in this very process can answer.

        A blocking download would deadlock here, since the reactor it waits on also runs the server.
        """
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        verifier = self.start({ISS_A: server.url})
        self.assertEqual(await self.accepted(verifier, issuer.token()), (ISS_A, "alice"))
        self.assertEqual(server.requests, 1)
        self.assertTrue(any(f"1 signing keys loaded from {server.url}" in line for line in self.logged()))

    async def test_es256_from_url(self):
        """When an ES256 issuer publishes its JWKS at a URL, its tokens are accepted."""
        issuer = TokenIssuer(ISS_B, "ec")
        server = await self.serve(issuer)
        verifier = self.start({ISS_B: server.url})
        self.assertEqual(await self.accepted(verifier, issuer.token(sub="bob")), (ISS_B, "bob"))

    async def test_unknown_kid_triggers_refetch(self):
        """When the IdP rotates its key, the first token naming the new kid makes the verifier fetch again."""
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        verifier = self.start({ISS_A: server.url})
        await self.accepted(verifier, issuer.token())
        issuer.rotate()
        self.clock.advance(REFETCH_INTERVAL)
        self.assertEqual(await self.accepted(verifier, issuer.token(sub="dave")), (ISS_A, "dave"))
        self.assertEqual(server.requests, 2)

    async def test_cancelled_wait_leaves_the_download(self):
        """When a verify() waiting for the download is cancelled, the download goes on for the others."""
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        verifier = self.start({ISS_A: server.url})
        gone = defer.Deferred.fromCoroutine(verifier.verify(issuer.token()))
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        self.assertEqual(await self.accepted(verifier, issuer.token()), (ISS_A, "alice"))
        self.assertEqual(server.requests, 1)

    async def test_refetch_is_rate_limited(self):
        """When tokens name unknown kids, the JWKS is fetched again at most once per REFETCH_INTERVAL."""
        issuer = TokenIssuer(ISS_A, "ec")
        server = await self.serve(issuer)
        verifier = self.start({ISS_A: server.url})
        await self.accepted(verifier, issuer.token())
        for number in range(10):
            junk = compact(issuer.header(headers={"kid": f"junk-{number}"}), issuer.claims(), b"x" * 64)
            await self.refused(verifier, junk, f"the token's key junk-{number} is not among the keys of issuer")
            self.clock.advance(REFETCH_INTERVAL / 10 - 1)
        self.assertEqual(server.requests, 1)
        self.clock.advance(10)
        await self.refused(verifier, compact(issuer.header(headers={"kid": "junk"}), issuer.claims(), b"x" * 64),
                           "the token's key junk is not among the keys of issuer")
        self.assertEqual(server.requests, 2)

    async def test_idp_down_at_start(self):
        """When the IdP is down at start, its tokens are refused clearly; once it is up and refetched, accepted."""
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        server.respond(503, b"maintenance")
        verifier = self.start({ISS_A: server.url})
        await self.refused(verifier, issuer.token(), f"the keys of issuer {ISS_A} are not available yet")
        self.assertTrue(any("HTTP 503" in line and "its tokens are refused" in line for line in self.logged()))
        server.recover()
        await self.refused(verifier, issuer.token(), "not available yet")  # rate limited: no new fetch yet
        self.assertEqual(server.requests, 1)
        self.clock.advance(REFETCH_INTERVAL)
        self.assertEqual(await self.accepted(verifier, issuer.token()), (ISS_A, "alice"))
        self.assertEqual(server.requests, 2)

    async def test_periodic_refresh_keeps_last_good_keys(self):
        """When the periodic refetch fails, the last good keys stay in use and a warning is logged."""
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        verifier = self.start({ISS_A: server.url})
        await self.accepted(verifier, issuer.token())
        server.respond(500, b"oops")
        self.clock.advance(REFRESH)
        await verifier.refresh()  # joins the download the timer started
        self.assertEqual(server.requests, 2)
        self.assertEqual(await self.accepted(verifier, issuer.token()), (ISS_A, "alice"))
        self.assertTrue(any("HTTP 500" in line and "keeping the 1 keys" in line for line in self.logged()))

    async def test_oversized_jwks(self):
        """When the JWKS answer is larger than MAX_JWKS_BYTES, it is not used."""
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        server.respond(200, b" " * (MAX_JWKS_BYTES + 1))
        verifier = self.start({ISS_A: server.url})
        await self.refused(verifier, issuer.token(), "not available yet")
        self.assertTrue(any(f"larger than {MAX_JWKS_BYTES} bytes" in line for line in self.logged()))

    async def test_download_timeout(self):
        """When the IdP does not answer within FETCH_TIMEOUT, the download fails and tokens are refused."""
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        server.hang()
        verifier = self.start({ISS_A: server.url})
        self.clock.advance(FETCH_TIMEOUT)
        await self.refused(verifier, issuer.token(), "not available yet")
        self.assertTrue(any(f"no complete answer within {FETCH_TIMEOUT:g}s" in line for line in self.logged()))

    async def test_stop_during_download(self):
        """When the service stops while a download hangs, the download is cancelled and the stop completes."""
        issuer = TokenIssuer(ISS_A, "rsa")
        server = await self.serve(issuer)
        server.hang()
        verifier = TokenVerifier({ISS_A: server.url}, (AUDIENCE,), reactor, self.clock, refresh=REFRESH)
        verifier.startService()
        await verifier.stopService()
        self.assertFalse(verifier.running)
