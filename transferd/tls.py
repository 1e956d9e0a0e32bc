"""TLS helpers shared by the HTTP clients (callback and Tape REST stagers, FTS client).

* pem_blocks(): the PEM blocks of some kinds in a file's bytes.
* load_trust_root(): the CAs in a PEM file or a hashed CA directory
  (/etc/grid-security/certificates), as a trust root.
* WatchedFile: a small file (bearer token, certificate, key) read again
  whenever it changes on disk (inode, size, mtime or ctime).
* X509Credential: our certificate, its key and chain, from cert + key files
  or one proxy file (proxy, key, chain); read again when the files change.
* ClientTLSPolicy: an IPolicyForHTTPS verifying servers against a trust root
  (None: the system's CAs) and presenting a client certificate, if any.
"""

import dataclasses
import os
import re

from twisted.internet import ssl
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


class CredentialError(ValueError):
    """A certificate, key, CA or token file cannot be read or used; the message names the file."""


def pem_blocks(data, kinds):
    """The PEM blocks in data whose type ends with one of kinds (e.g. b"CERTIFICATE", b"PRIVATE KEY")."""
    return [m.group(0) if m.group(0).endswith(b"\n") else m.group(0) + b"\n"
            for m in PEM_BLOCK.finditer(data) if m.group(1).endswith(kinds)]


def load_trust_root(ca_path):
    """The CA certificates in a PEM file, or in the files of a (hashed) directory, as a trust root.

    Files of a CA directory that hold no usable certificate (.signing_policy,
    .namespaces, CRLs) are skipped.
    """
    names = [ca_path]
    if os.path.isdir(ca_path):
        names = [os.path.join(ca_path, name) for name in sorted(os.listdir(ca_path))]
    seen, certificates = set(), []
    for name in names:
        try:
            with open(name, "rb") as handle:
                data = handle.read()
        except OSError:
            continue  # a subdirectory, a dangling link, an unreadable file
        for block in pem_blocks(data, (b"CERTIFICATE",)):
            if block in seen:
                continue
            seen.add(block)
            try:
                certificates.append(ssl.Certificate.loadPEM(block))
            except Exception:
                continue  # not a certificate OpenSSL can use (a TRUSTED CERTIFICATE...)
    if not certificates:
        raise CredentialError(f"no CA certificate found in {ca_path}")
    return ssl.trustRootFromCertificates(certificates)


class WatchedFile:
    """A small file read again whenever it changes on disk (inode, size, mtime or ctime)."""

    def __init__(self, path):
        self.path = path
        self._stamp = None
        self._data = None

    def invalidate(self):
        """Read the file again next time (e.g. the server refused the token)."""
        self._stamp = None

    def read(self):
        """The file's bytes (OSError if it cannot be read)."""
        info = os.stat(self.path)
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if stamp != self._stamp:
            with open(self.path, "rb") as handle:
                self._data = handle.read()
            self._stamp = stamp
        return self._data


@dataclasses.dataclass(frozen=True)
class LoadedCredential:
    cert_pem: bytes  # our certificate (or proxy)
    key_pem: bytes  # its private key
    chain_pem: bytes  # the certificates that signed it, if we have them
    tls_certificate: ssl.PrivateCertificate
    tls_chain: tuple  # of OpenSSL X509, sent after our certificate


class X509Credential:
    """Our certificate and key: cert + key files, or one proxy file (proxy, key, chain).

    cert holds the certificate first, then any chain; key may be omitted when
    it is in cert.  The files are read again when they change (proxies are
    renewed in place).  Problems raise `error` (CredentialError; subclasses
    may choose another exception taking the message) naming the file.
    """

    error = CredentialError

    def __init__(self, cert=None, key=None, proxy=None):
        if proxy:
            self.cert_path = self.key_path = proxy
        elif cert:
            self.cert_path, self.key_path = cert, key or cert
        else:
            raise ValueError("an X.509 credential needs a proxy file, or a certificate and a key")
        self._cert = WatchedFile(self.cert_path)
        self._key = self._cert if self.key_path == self.cert_path else WatchedFile(self.key_path)
        self._loaded = None  # ((cert bytes, key bytes), LoadedCredential)

    def load(self):
        """The LoadedCredential from the current files."""
        try:
            data = (self._cert.read(), self._key.read())
        except OSError as error:
            raise self.error(
                f"cannot read the X.509 credential {error.filename or self.cert_path}: {error.strerror}") from None
        if self._loaded is None or self._loaded[0] != data:
            self._loaded = (data, self._parse(*data))
        return self._loaded[1]

    def _parse(self, cert_data, key_data):
        from OpenSSL import crypto

        certificates = pem_blocks(cert_data, (b"CERTIFICATE",))
        keys = pem_blocks(key_data, (b"PRIVATE KEY",))
        if not certificates:
            raise self.error(f"no certificate found in {self.cert_path}")
        if not keys:
            raise self.error(f"no private key found in {self.key_path}")
        if b"ENCRYPTED" in keys[0].split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in keys[0]:
            raise self.error(f"the private key in {self.key_path} is encrypted; use an unencrypted key or a proxy")
        try:
            tls_certificate = ssl.PrivateCertificate.loadPEM(certificates[0] + keys[0])
            chain = tuple(crypto.load_certificate(crypto.FILETYPE_PEM, pem) for pem in certificates[1:])
        except Exception as error:
            raise self.error(f"cannot use the X.509 credential {self.cert_path}: {error}") from None
        return LoadedCredential(certificates[0], keys[0], b"".join(certificates[1:]), tls_certificate, chain)


@implementer(IPolicyForHTTPS)
class ClientTLSPolicy:
    """Verifies servers against trust_root (None: the system's CAs); presents credential's certificate, if any."""

    def __init__(self, trust_root=None, credential=None):
        self.trust_root = trust_root
        self.credential = credential

    def creatorForNetloc(self, hostname, port):
        kwargs = {}
        if self.credential is not None:
            loaded = self.credential.load()
            kwargs["clientCertificate"] = loaded.tls_certificate
            if loaded.tls_chain:
                kwargs["extraCertificateOptions"] = {"extraCertChain": list(loaded.tls_chain)}
        return ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=self.trust_root, **kwargs)


def reconfigure_client_credential(policy, cert, key, name):
    """New cert and key file names for a ClientTLSPolicy built with a certificate (SIGHUP); name: the keys, for
    messages.  ConfigError, the policy unchanged, when the files cannot be used or a certificate comes or goes
    (that needs a restart)."""
    from transferd.config import ConfigError

    current = policy.credential if policy is not None else None
    if (current is None) != (not cert):
        raise ConfigError(f"{name}: starting or stopping to present a client certificate needs a restart")
    if current is None or (current.cert_path, current.key_path) == (cert, key or cert):
        return False
    try:
        replace_credential(policy, X509Credential(cert, key))
    except CredentialError as error:
        raise ConfigError(f"{name}: {error}") from None
    return True


def replace_credential(policy, credential):
    """Make a ClientTLSPolicy present credential (an X509Credential, loaded first: CredentialError if its files
    cannot be used, the policy unchanged) from the next connection on (SIGHUP: renewed credential files)."""
    if credential is not None:
        credential.load()
    policy.credential = credential


def client_tls_policy(ca_path=None, cert=None, key=None):
    """A ClientTLSPolicy from file names: ca_path (file or directory), cert (or a proxy) and key.

    The credential is loaded at once, so that unusable files fail at start-up
    (CredentialError), not at the first request.
    """
    trust_root = load_trust_root(ca_path) if ca_path else None
    credential = X509Credential(cert, key) if cert else None
    if credential is not None:
        credential.load()
    return ClientTLSPolicy(trust_root, credential)
