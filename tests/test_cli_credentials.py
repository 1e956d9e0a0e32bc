"""transferctl finds credentials where grid users keep them, in the grid's order, and says clearly what is wrong."""

import datetime
import os
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from tests.test_cli import TRANSFERCTL, cli_env
from transferd.cli import credentials
from transferd.cli.errors import CREDENTIALS, CLIError
from transferd.testing import x509 as testx509

UID = 4242


@pytest.fixture(scope="module")
def ca():
    return testx509.make_ca(key_kind="ec")


@pytest.fixture
def places(tmp_path, ca):
    """A home with ~/.globus, a /tmp stand-in with a proxy and a token, a proxy elsewhere and XDG_RUNTIME_DIR."""
    user = testx509.make_user(ca, "Alice Example", key_kind="ec")
    home, tmp, runtime = tmp_path / "home", tmp_path / "tmp", tmp_path / "run"
    for directory in (home, tmp, runtime):
        directory.mkdir()
    testx509.write_credentials(str(home / ".globus"), user=user)
    proxy = testx509.make_proxy(user, key_kind="ec")
    (tmp / f"x509up_u{UID}").write_bytes(proxy.proxy_file_pem)
    (tmp / f"bt_u{UID}").write_text("tmp-token\n")
    (runtime / f"bt_u{UID}").write_text("  runtime-token \n")
    (tmp_path / "token").write_text("file-token\n")
    named = testx509.write_credentials(str(tmp_path / "named"), proxy=proxy).proxy
    return {"home": str(home), "tmp": str(tmp), "runtime": str(runtime), "token_file": str(tmp_path / "token"),
            "proxy": named, "user": user}


def find(places, **environ):
    return credentials.find(environ, uid=UID, tmp_dir=places["tmp"], home=places["home"])


def test_certificate_order(places):
    """When several certificates are there, X509_USER_PROXY wins, then /tmp/x509up_u<uid>, then ~/.globus."""
    assert find(places, X509_USER_PROXY=places["proxy"]).certificate.cert_file == places["proxy"]
    default_proxy = os.path.join(places["tmp"], f"x509up_u{UID}")
    assert find(places).certificate.cert_file == default_proxy
    assert find(places).certificate.is_proxy
    os.remove(default_proxy)
    found = find(places).certificate
    assert (found.cert_file, found.key_file, found.is_proxy) == (
        os.path.join(places["home"], ".globus", "usercert.pem"),
        os.path.join(places["home"], ".globus", "userkey.pem"), False)


def test_user_cert_variables(places, tmp_path):
    """When X509_USER_CERT and X509_USER_KEY are set (and no proxy is there), they replace ~/.globus."""
    os.remove(os.path.join(places["tmp"], f"x509up_u{UID}"))
    other = testx509.write_credentials(str(tmp_path / "other"), user=places["user"])
    found = find(places, X509_USER_CERT=other.user_cert, X509_USER_KEY=other.user_key).certificate
    assert (found.cert_file, found.key_file) == (other.user_cert, other.user_key)
    with pytest.raises(CLIError, match="X509_USER_CERT and X509_USER_KEY go together"):
        find(places, X509_USER_CERT=other.user_cert)


def test_no_certificate(places):
    """When ~/.globus holds a certificate without its key and no proxy is there, no certificate is presented."""
    os.remove(os.path.join(places["tmp"], f"x509up_u{UID}"))
    os.remove(os.path.join(places["home"], ".globus", "userkey.pem"))
    assert find(places).certificate is None


def test_token_order(places):
    """When several tokens are there, the WLCG discovery order picks one, white space stripped."""
    assert find(places, BEARER_TOKEN=" env-token\n", BEARER_TOKEN_FILE=places["token_file"]).token.value == "env-token"
    assert find(places, BEARER_TOKEN_FILE=places["token_file"], XDG_RUNTIME_DIR=places["runtime"]).token.value == \
        "file-token"
    assert find(places, XDG_RUNTIME_DIR=places["runtime"]).token.value == "runtime-token"
    assert find(places).token.value == "tmp-token"
    os.remove(os.path.join(places["tmp"], f"bt_u{UID}"))
    assert find(places, XDG_RUNTIME_DIR=places["tmp"]).token is None


@pytest.mark.parametrize("variable, message", [
    ("X509_USER_PROXY", "X509_USER_PROXY=/nowhere/x509up does not exist"),
    ("BEARER_TOKEN_FILE", "BEARER_TOKEN_FILE=/nowhere/x509up does not exist"),
    ("X509_CERT_DIR", "X509_CERT_DIR=/nowhere/x509up is not a directory"),
])
def test_named_place_missing(places, variable, message):
    """When a variable names a file or directory that is not there, the error names the variable."""
    with pytest.raises(CLIError) as raised:
        find(places, **{variable: "/nowhere/x509up"})
    assert (raised.value.message, raised.value.exit_code) == (message, CREDENTIALS)


def test_empty_token_file(places):
    """When the token file is empty, the error says so instead of sending an empty token."""
    with open(places["token_file"], "w"):
        pass
    with pytest.raises(CLIError, match="is empty"):
        find(places, BEARER_TOKEN_FILE=places["token_file"])


def test_expired_proxy(places, ca, tmp_path):
    """When the proxy has expired, the error says when and how to make a new one, before any connection."""
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    old_user = testx509.make_user(ca, "Alice Example", key_kind="ec", now=past)
    expired = testx509.make_proxy(old_user, lifetime_seconds=3600, key_kind="ec", now=past)
    path = testx509.write_credentials(str(tmp_path / "expired"), proxy=expired).proxy
    with pytest.raises(CLIError) as raised:
        credentials.tls_context(find(places, X509_USER_PROXY=path))
    assert raised.value.exit_code == CREDENTIALS
    assert "expired at" in raised.value.message and "voms-proxy-init" in raised.value.message


def test_mismatched_key(places, ca, tmp_path):
    """When the key does not belong to the certificate, the error names both files."""
    alice = testx509.write_credentials(str(tmp_path / "alice"), user=places["user"])
    bob = testx509.write_credentials(str(tmp_path / "bob"), user=testx509.make_user(ca, "Bob Example", key_kind="ec"))
    os.remove(os.path.join(places["tmp"], f"x509up_u{UID}"))
    with pytest.raises(CLIError) as raised:
        credentials.tls_context(find(places, X509_USER_CERT=alice.user_cert, X509_USER_KEY=bob.user_key))
    assert raised.value.exit_code == CREDENTIALS
    assert alice.user_cert in raised.value.message and bob.user_key in raised.value.message
    assert "key values mismatch" in raised.value.message


def test_encrypted_key_without_terminal(places, tmp_path):
    """When the key has a pass phrase and stdin is no terminal, transferctl says to make a proxy, in one line."""
    user = places["user"]
    directory = tmp_path / "encrypted"
    directory.mkdir()
    (directory / "usercert.pem").write_bytes(user.cert_pem)
    key = directory / "userkey.pem"
    key.write_bytes(user.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"secret")))
    key.chmod(0o600)
    env = cli_env(tmp_path, X509_USER_CERT=str(directory / "usercert.pem"), X509_USER_KEY=str(key),
                  X509_CERT_DIR=str(tmp_path))
    result = subprocess.run([TRANSFERCTL, "whoami", "--url", "https://127.0.0.1:1"], env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert result.returncode == CREDENTIALS, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert "protected by a pass phrase" in result.stderr and "proxy" in result.stderr
