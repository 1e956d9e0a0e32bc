"""The parts SIGHUP reconfigures (transferd.interfaces.IReconfigurable), each on its own: the new settings
are used at once, and a refusal (ConfigError) leaves the part as it was."""

import os

from cryptography import x509
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from transferd.auth.access import Access
from transferd.auth.tokens import TokenError, TokenVerifier
from transferd.auth.x509 import ServerTLS
from transferd.config import ConfigError, load_config
from transferd.fts.client import FTSClient
from transferd.interfaces import IReconfigurable
from transferd.taperest.client import TapeRestClient
from transferd.testing import x509 as testing_x509
from transferd.testing.tokens import TokenIssuer

OLD_ISS, NEW_ISS = "https://old-idp.example.org", "https://new-idp.example.org"


def config(**overrides):
    return load_config(None, {tuple(key.split("__")): value for key, value in overrides.items()}, check_files=False)


class TokenVerifierTests(unittest.TestCase):
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.old, self.new = TokenIssuer(OLD_ISS, kind="ec"), TokenIssuer(NEW_ISS, kind="rsa")
        self.old_jwks, self.new_jwks = os.path.join(directory, "old.json"), os.path.join(directory, "new.json")
        self.old.write_jwks(self.old_jwks)
        self.new.write_jwks(self.new_jwks)
        self.verifier = TokenVerifier({OLD_ISS: self.old_jwks}, ["aud-1"], reactor, task.Clock())
        self.addCleanup(self.verifier.http.stop)

    @defer.inlineCallbacks
    def test_issuers_and_audiences_change_at_once(self):
        """After reconfigure, the new issuer's tokens for the new audience pass; the old issuer's and audience's do not."""
        self.assertTrue(verifyObject(IReconfigurable, self.verifier))
        yield self.verifier.verify(self.old.token(sub="alice", aud="aud-1"))
        self.verifier.reconfigure(config(auth__token_issuers=f"{NEW_ISS} {self.new_jwks}",
                                         auth__token_audiences="aud-2"))
        who = yield self.verifier.verify(self.new.token(sub="bob", aud="aud-2"))
        self.assertEqual(who.sub, "bob")
        for token, why in ((self.old.token(sub="alice", aud="aud-2"), "not trusted"),
                           (self.new.token(sub="bob", aud="aud-1"), "audience")):
            with self.assertRaises(TokenError) as refused:
                yield self.verifier.verify(token)
            self.assertIn(why, str(refused.exception))

    @defer.inlineCallbacks
    def test_turning_tokens_off_refused(self):
        """Reconfiguring without issuers is refused (a restart turns tokens off), and the issuers stay."""
        self.assertRaises(ConfigError, self.verifier.reconfigure, config())
        yield self.verifier.verify(self.old.token(sub="alice", aud="aud-1"))


class AccessTests(unittest.TestCase):
    def test_admins_change_tokens_cannot_come(self):
        """New admins apply at once; tokens where there were none need a restart, and leave the admins as they were."""
        access = Access(admins=["/DC=org/CN=Old"])
        access.reconfigure(config(auth__admins="/DC=org/CN=New"))
        self.assertEqual(access.admins, frozenset({"/DC=org/CN=New"}))
        self.assertRaises(ConfigError, access.reconfigure, config(auth__admins="/DC=org/CN=Other",
                                                                  auth__token_issuers=f"{OLD_ISS} /jwks.json",
                                                                  auth__token_audiences="aud"))
        self.assertEqual(access.admins, frozenset({"/DC=org/CN=New"}))


class CredentialTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.ca = testing_x509.make_ca()
        self.first = testing_x509.write_credentials(os.path.join(self.directory, "first"), ca=self.ca,
                                                    user=testing_x509.make_user(self.ca, "First"),
                                                    host=testing_x509.make_host(self.ca))
        self.second = testing_x509.write_credentials(os.path.join(self.directory, "second"), ca=self.ca,
                                                     user=testing_x509.make_user(self.ca, "Second"))

    def tls_config(self, ca_path):
        return config(auth__x509_ca_path=ca_path, api__tls_cert=self.first.host_cert, api__tls_key=self.first.host_key)

    def test_server_ca_directory(self):
        """A new CA directory is checked, then used for the next connection; one without CAs is refused."""
        tls = ServerTLS(self.first.host_cert, self.first.host_key, ca_path=self.first.ca_dir, clock=task.Clock())
        context = tls._context
        tls.reconfigure(self.tls_config(self.second.ca_dir))
        self.assertEqual(tls.ca_path, self.second.ca_dir)
        self.assertIsNot(tls._context, context)
        empty = os.path.join(self.directory, "empty")
        os.makedirs(empty)
        for path in (empty, os.path.join(self.directory, "missing")):
            self.assertRaises(ConfigError, tls.reconfigure, self.tls_config(path))
            self.assertEqual(tls.ca_path, self.second.ca_dir)
        self.assertRaises(ConfigError, tls.reconfigure, config())  # client certificates off: a restart

    def test_fts_certificate(self):
        """The FTS client presents the new certificate from the next connection; an unusable one is refused."""
        client = FTSClient("https://fts.example.org:8446", reactor, task.Clock(), auth="x509",
                           cert=self.first.user_cert, key=self.first.user_key)
        self.addCleanup(client.http.stop)
        client.reconfigure_credentials(None, self.second.user_cert, self.second.user_key, None)
        self.assertEqual(client.tls_policy.credential.cert_path, self.second.user_cert)
        presented = x509.load_pem_x509_certificate(client.tls_policy.credential.load().cert_pem)
        self.assertIn("CN=Second", presented.subject.rfc4514_string())
        self.assertRaises(ConfigError, client.reconfigure_credentials, None, self.directory + "/nothing.pem", None,
                          None)
        self.assertEqual(client.credential.cert_path, self.second.user_cert)

    def test_fts_token_file(self):
        """A new token file is used for the next request; an empty one is refused and the old one kept."""
        files = []
        for name, text in (("one", "token-one"), ("two", "token-two"), ("empty", "")):
            files.append(os.path.join(self.directory, name))
            with open(files[-1], "w") as handle:
                handle.write(text)
        client = FTSClient("https://fts.example.org:8446", reactor, task.Clock(), auth="token", token_file=files[0])
        self.addCleanup(client.http.stop)
        client.reconfigure_credentials(files[1], None, None, None)
        self.assertEqual(client.token.text(), "token-two")
        self.assertRaises(ConfigError, client.reconfigure_credentials, files[2], None, None, None)
        self.assertEqual(client.token.text(), "token-two")

    def test_tape_rest_credentials(self):
        """The Tape REST client takes a new token file; a client certificate where there was none needs a restart."""
        token = os.path.join(self.directory, "token")
        with open(token, "w") as handle:
            handle.write("tape-token")
        client = TapeRestClient("https://tape.example.org", "/pnfs/example.org/data", reactor, task.Clock())
        self.addCleanup(client.http.stop)
        client.reconfigure_credentials(token, None, None)
        self.assertEqual(client._token.path, token)
        self.assertRaises(ConfigError, client.reconfigure_credentials, token, self.first.user_cert,
                          self.first.user_key)
        self.assertRaises(ConfigError, client.reconfigure_credentials, self.directory + "/none", None, None)
        self.assertEqual(client._token.path, token)
