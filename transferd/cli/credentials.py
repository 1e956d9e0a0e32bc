"""Where transferctl finds its credentials: the places grid users keep them.

X.509 (presented on https URLs only):
  X509_USER_PROXY, else /tmp/x509up_u<uid>, else X509_USER_CERT and
  X509_USER_KEY (default ~/.globus/usercert.pem and userkey.pem).
Bearer token, by WLCG Bearer Token Discovery (sent whenever one is found):
  BEARER_TOKEN, else the file BEARER_TOKEN_FILE, else
  $XDG_RUNTIME_DIR/bt_u<uid>, else /tmp/bt_u<uid>.
The server is verified against X509_CERT_DIR (default
/etc/grid-security/certificates, or the system's CAs when that default
directory does not exist).

A place named by a variable must hold a usable file; a default place is
simply skipped when empty, as the grid tools do.
"""

import dataclasses
import datetime
import getpass
import os
import ssl
import sys
from typing import Optional

from cryptography import x509

from transferd.cli.errors import CREDENTIALS, CLIError

DEFAULT_CERT_DIR = "/etc/grid-security/certificates"


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A certificate (or proxy) to present and its key; the key may sit in the same file (a proxy)."""

    cert_file: str
    key_file: str
    source: str  # where it was found, in the user's words: "X509_USER_PROXY", "/tmp/x509up_u1000", ...
    is_proxy: bool


@dataclasses.dataclass(frozen=True)
class Token:
    value: str
    source: str


@dataclasses.dataclass(frozen=True)
class Credentials:
    certificate: Optional[Certificate]
    token: Optional[Token]
    ca_dir: Optional[str]  # None: the system's CAs

    def describe(self):
        """What is presented, for whoami and for error lines."""
        parts = []
        if self.certificate is not None:
            kind = "proxy" if self.certificate.is_proxy else "certificate"
            parts.append(f"{kind} {self.certificate.cert_file} ({self.certificate.source})")
        if self.token is not None:
            parts.append(f"token from {self.token.source}")
        return " and ".join(parts) or "no credential"


def find(environ=None, uid=None, tmp_dir="/tmp", home=None):
    """The credentials this user has, found in the grid's order (see the module docstring)."""
    environ = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    home = home or environ.get("HOME") or os.path.expanduser("~")
    return Credentials(
        certificate=find_certificate(environ, uid, tmp_dir, home),
        token=find_token(environ, uid, tmp_dir),
        ca_dir=find_ca_dir(environ),
    )


def find_certificate(environ, uid, tmp_dir, home):
    named = environ.get("X509_USER_PROXY")
    if named:
        _require_file(named, "X509_USER_PROXY")
        return Certificate(named, named, f"X509_USER_PROXY={named}", is_proxy=True)
    default_proxy = os.path.join(tmp_dir, f"x509up_u{uid}")
    if os.path.isfile(default_proxy):
        return Certificate(default_proxy, default_proxy, default_proxy, is_proxy=True)
    cert = environ.get("X509_USER_CERT")
    key = environ.get("X509_USER_KEY")
    if cert or key:
        if not (cert and key):
            raise CLIError("X509_USER_CERT and X509_USER_KEY go together: set both", CREDENTIALS)
        _require_file(cert, "X509_USER_CERT")
        _require_file(key, "X509_USER_KEY")
        return Certificate(cert, key, "X509_USER_CERT", is_proxy=False)
    cert = os.path.join(home, ".globus", "usercert.pem")
    key = os.path.join(home, ".globus", "userkey.pem")
    if os.path.isfile(cert) and os.path.isfile(key):
        return Certificate(cert, key, "~/.globus", is_proxy=False)
    return None


def find_token(environ, uid, tmp_dir):
    value = environ.get("BEARER_TOKEN")
    if value and value.strip():
        return Token(value.strip(), "BEARER_TOKEN")
    named = environ.get("BEARER_TOKEN_FILE")
    if named:
        _require_file(named, "BEARER_TOKEN_FILE")
        return _token_file(named, f"BEARER_TOKEN_FILE={named}")
    places = [os.path.join(tmp_dir, f"bt_u{uid}")]
    if environ.get("XDG_RUNTIME_DIR"):
        places.insert(0, os.path.join(environ["XDG_RUNTIME_DIR"], f"bt_u{uid}"))
    for path in places:
        if os.path.isfile(path):
            return _token_file(path, path)
    return None


def find_ca_dir(environ):
    named = environ.get("X509_CERT_DIR")
    if named:
        if not os.path.isdir(named):
            raise CLIError(f"X509_CERT_DIR={named} is not a directory", CREDENTIALS)
        return named
    return DEFAULT_CERT_DIR if os.path.isdir(DEFAULT_CERT_DIR) else None


def _require_file(path, variable):
    if not os.path.isfile(path):
        raise CLIError(f"{variable}={path} does not exist", CREDENTIALS)


def _token_file(path, source):
    try:
        with open(path) as handle:
            value = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read the token in {path}: {_reason(error)}", CREDENTIALS) from None
    if not value:
        raise CLIError(f"the token file {path} is empty", CREDENTIALS)
    return Token(value, source)


def tls_context(credentials, now=None):
    """An SSL context verifying the server by credentials.ca_dir and presenting the certificate, if any."""
    try:
        context = ssl.create_default_context(capath=credentials.ca_dir)
    except ssl.SSLError as error:
        raise CLIError(f"cannot read the CA directory {credentials.ca_dir}: {_reason(error)}", CREDENTIALS) from None
    certificate = credentials.certificate
    if certificate is not None:
        _check_not_expired(certificate, now or datetime.datetime.now(datetime.timezone.utc))
        try:
            context.load_cert_chain(certificate.cert_file, certificate.key_file, password=_pass_phrase(certificate))
        except (ssl.SSLError, OSError) as error:
            raise CLIError(f"cannot use the {_kind(certificate)} {certificate.cert_file} with its key "
                           f"{certificate.key_file}: {_reason(error)}", CREDENTIALS) from None
    return context


def _check_not_expired(certificate, now):
    try:
        with open(certificate.cert_file, "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot read the {_kind(certificate)} {certificate.cert_file}: {_reason(error)}",
                       CREDENTIALS) from None
    expired = cert.not_valid_after_utc
    if expired <= now:
        renew = "make a new one (voms-proxy-init or grid-proxy-init)" if certificate.is_proxy else "renew it"
        raise CLIError(f"the {_kind(certificate)} {certificate.cert_file} expired at "
                       f"{expired.strftime('%Y-%m-%d %H:%M:%S')} UTC: {renew}", CREDENTIALS)


def _pass_phrase(certificate):
    """A callback OpenSSL calls only when the key is encrypted: ask on the terminal, or say what to do."""

    def ask():
        if not sys.stdin.isatty():
            raise CLIError(f"the key {certificate.key_file} is protected by a pass phrase and there is no terminal "
                           "to ask for it: make a proxy (voms-proxy-init or grid-proxy-init) and use that",
                           CREDENTIALS)
        return getpass.getpass(f"Enter pass phrase for {certificate.key_file}: ")

    return ask


def _kind(certificate):
    return "proxy" if certificate.is_proxy else "certificate"


def _reason(error):
    """A short reason: OpenSSL's code in words ("key values mismatch"), or the system's."""
    if isinstance(error, ssl.SSLError) and error.reason:
        return "not a PEM certificate or key" if error.reason == "PEM lib" else error.reason.replace("_", " ").lower()
    return getattr(error, "strerror", None) or str(error)
