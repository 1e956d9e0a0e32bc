"""transferctl against the real daemon over HTTPS: certificates, proxies and tokens found where grid users keep them.

One twistd per module with TLS, a grid CA directory (with a CRL revoking
Mallory), a JWKS file for tokens and an admin known by token.
"""

import os
import uuid

import pytest

from tests.test_cli import CLI, cli_env, destination, start_daemon
from tests.test_e2e_auth import ISS, Credentials, dn
from transferd.cli import errors
from transferd.testing.tokens import AUDIENCE, TokenIssuer


@pytest.fixture(scope="module")
def exposed(tmp_path_factory):
    """(daemon, credentials), the daemon answering at https://localhost:PORT."""
    workdir = str(tmp_path_factory.mktemp("exposed"))
    creds = Credentials(os.path.join(workdir, "credentials"))
    daemon = start_daemon(
        workdir, tls_ca=creds.paths.ca_cert,
        api={"tls_cert": creds.paths.host_cert, "tls_key": creds.paths.host_key},
        auth={"x509_ca_path": creds.ca_dir, "token_audiences": AUDIENCE, "token_issuers": f"{ISS} {creds.jwks}",
              "admins": f"SUB=operator, ISS={ISS}"},
        stager={"delay": "0.2"},
    )
    yield daemon, creds
    daemon.stop()


@pytest.fixture
def as_user(exposed, tmp_path):
    """as_user(name) is transferctl presenting that user's credential, trusting the test CA by X509_CERT_DIR."""
    daemon, creds = exposed
    token_file = tmp_path / "carol.token"
    token_file.write_text(creds.issuer.token(sub="carol") + "\n")
    places = {
        "alice": {"X509_USER_CERT": creds.files["alice"].user_cert, "X509_USER_KEY": creds.files["alice"].user_key},
        "bob-proxy": {"X509_USER_PROXY": creds.files["bob-proxy"].proxy},
        "mallory": {"X509_USER_CERT": creds.files["mallory"].user_cert,
                    "X509_USER_KEY": creds.files["mallory"].user_key},
        "carol": {"BEARER_TOKEN_FILE": str(token_file)},
        "operator": {"BEARER_TOKEN": creds.issuer.token(sub="operator")},
        "forger": {"BEARER_TOKEN": TokenIssuer(ISS, kind="ec").token(sub="operator")},
        "nobody": {},
    }

    def make(name, ca_dir=creds.ca_dir):
        return CLI(cli_env(tmp_path, TRANSFERD_URL=daemon.url, X509_CERT_DIR=ca_dir, **places[name]))

    return make


def test_whoami_by_each_credential(as_user, exposed):
    """When a certificate, a proxy or a token is found, whoami names the identity the daemon sees, and admins."""
    _, creds = exposed
    seen = {name: as_user(name).json_lines("whoami")[0] for name in ("alice", "bob-proxy", "carol", "operator")}
    assert {name: (answer["identity"], answer["method"], answer["admin"]) for name, answer in seen.items()} == {
        "alice": (dn(creds.alice), "x509", False),
        "bob-proxy": (dn(creds.bob), "x509", False),
        "carol": (f"SUB=carol, ISS={ISS}", "token", False),
        "operator": (f"SUB=operator, ISS={ISS}", "token", True),
    }
    assert seen["bob-proxy"]["presented"].startswith(f"proxy {creds.files['bob-proxy'].proxy} (X509_USER_PROXY=")
    text = as_user("alice").ok("whoami")
    assert f"identity   {dn(creds.alice)}" in text and "admin      no" in text


def test_own_jobs_others_forbidden(as_user, exposed):
    """When Bob asks about Alice's job he gets one line and exit 6; the admin lists and cancels it."""
    daemon, creds = exposed
    alice, bob, operator = as_user("alice"), as_user("bob-proxy"), as_user("operator")
    label = uuid.uuid4().hex
    job_id = alice.ok("submit", "sample-001", destination(daemon), "--label", label).strip()
    assert [view["job_id"] for view in alice.json_lines("list", "--label", label)] == [job_id]
    for args in (["status", job_id], ["list", "--submitter", dn(creds.alice)], ["cancel", job_id]):
        code, out, err = bob(*args)
        assert (code, out) == (errors.FORBIDDEN, ""), (args, err)
        assert "not allowed (403" in err and err.count("\n") == 1, err
    assert bob.json_lines("list", "--label", label) == []
    listed = operator.json_lines("list", "--submitter", dn(creds.alice), "--label", label)
    assert [view["job_id"] for view in listed] == [job_id]


def test_token_user_waits_to_success(as_user, exposed):
    """When a token user submits with --wait over HTTPS, the job ends in SUCCESS and transferctl exits 0."""
    daemon, _ = exposed
    code, out, err = as_user("carol")("submit", "sample-001", destination(daemon), "--wait", "--interval", "0.2")
    assert code == errors.OK, err
    assert out.splitlines()[-1] == "1 job: 1 SUCCESS"


@pytest.mark.parametrize("name, ca_dir, expected, words", [
    ("nobody", None, errors.CREDENTIALS, "wants a credential and none was found (401"),
    ("forger", None, errors.CREDENTIALS, "did not accept the token from BEARER_TOKEN (401"),
    ("mallory", None, errors.CREDENTIALS, "refused the TLS handshake"),
    ("alice", "empty", errors.UNREACHABLE, "cannot verify the certificate of https://localhost"),
])
def test_refused(as_user, tmp_path, name, ca_dir, expected, words):
    """When the credential is missing, forged or revoked, or the server is not trusted, one line says which."""
    if ca_dir == "empty":
        ca_dir = str(tmp_path / "no-cas")
        os.makedirs(ca_dir)
    cli = as_user(name) if ca_dir is None else as_user(name, ca_dir=ca_dir)
    code, out, err = cli("whoami")
    assert (code, out) == (expected, ""), err
    assert words in err and err.count("\n") == 1, err
