"""Who is asking, and what they may see and do.

An identity is one canonical string, stored as the job's submitter:
* an X.509 client (certificate or RFC 3820 proxy): the end-entity DN in the
  grid's slash form, e.g. "/DC=org/DC=example/CN=Alice" (transferd.auth.x509);
* a bearer token: "SUB=<sub>, ISS=<iss>", the form Rucio uses for token
  identities, so the (iss, sub) pair is kept whole.
An X.509 client may also carry VOMS FQANs (transferd.auth.voms), believed
only from the VOMS servers of [auth] voms_dir.  Rules ([auth] admins) name
identities, or FQANs ("/meerkat/Role=production"), which match an identity
with an FQAN equal to or under them.

Without [auth] configured, nobody is authenticated and everyone may do
everything; transferd then listens only on loopback (transferd.tap).
"""

import dataclasses
from typing import Optional

from zope.interface import implementer

from transferd.auth import x509
from transferd.auth.tokens import TokenError
from transferd.auth.voms import fqan_matches
from transferd.config import ConfigError
from transferd.interfaces import IReconfigurable


class Unauthenticated(Exception):
    """401: no usable credential; the message says what to present."""


class Forbidden(Exception):
    """403: authenticated, but not allowed to do this."""


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str  # the canonical form above
    method: str  # "x509" or "token"
    fqans: tuple = ()  # the believed VOMS FQANs of an X.509 client


def is_fqan(rule):
    """True when a configured rule names an FQAN ("/vo/group/Role=r"), not a DN ("/DC=org/.../CN=x")."""
    return rule.startswith("/") and "=" not in rule[1:].split("/", 1)[0]


def matches(identity, rules):
    """True when identity is one of rules (a frozenset of identities and FQANs)."""
    if identity is None:
        return False
    return identity.name in rules or any(is_fqan(rule) and fqan_matches(identity.fqans, rule) for rule in rules)


def token_identity(iss, sub):
    return f"SUB={sub}, ISS={iss}"


@implementer(IReconfigurable)
class Access:
    """Authentication (client certificate DN, bearer token) and the rules on jobs.

    x509: client certificates are verified by the TLS listener; here only
    the verified DN is read.  tokens: a started TokenVerifier, or None.
    voms: a transferd.auth.voms.VOMSTrust that reads X.509 clients' FQANs, or None.
    """

    def __init__(self, x509=False, tokens=None, admins=(), stager_dns=(), voms=None):
        self.x509 = x509
        self.voms = voms
        self.tokens = tokens
        self.admins = frozenset(admins)
        self.stager_dns = frozenset(stager_dns)

    def reconfigure(self, config):
        """New [auth] admins and stager_dns.  Turning client certificates or bearer tokens on or off changes
        what the listener asks of clients: that needs a restart."""
        auth = config.auth
        if bool(auth.x509_ca_path) != bool(self.x509):
            raise ConfigError("[auth] x509_ca_path: turning client certificates on or off needs a restart")
        if bool(auth.token_issuers) != (self.tokens is not None):
            raise ConfigError("[auth] token_issuers: turning bearer tokens on or off needs a restart")
        self.admins, self.stager_dns = frozenset(auth.admins), frozenset(auth.stager_dns)

    @property
    def enabled(self):
        return bool(self.x509 or self.tokens)

    def challenge(self):
        """The WWW-Authenticate value of a 401 (RFC 6750), when tokens are accepted."""
        return 'Bearer realm="transferd"' if self.tokens else None

    async def identify(self, request) -> Optional[Identity]:
        """The identity behind request; None when authentication is off. Raises Unauthenticated."""
        if not self.enabled:
            return None
        header = request.getHeader("authorization")
        if header is not None:
            return await self._bearer(header)
        dn, chain = x509.peer_certificate(request) if self.x509 else (None, [])
        if dn is not None:
            return Identity(dn, "x509", self.voms.fqans(chain) if self.voms is not None else ())
        raise Unauthenticated("authentication required: " + self._how())

    def _how(self):
        ways = []
        if self.x509:
            ways.append("a client certificate or proxy")
        if self.tokens:
            ways.append("a bearer token (Authorization: Bearer ...)")
        return "present " + " or ".join(ways)

    async def _bearer(self, header):
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        if self.tokens is None:
            raise Unauthenticated("this service does not accept bearer tokens: " + self._how())
        try:
            claims = await self.tokens.verify(token.strip())
        except TokenError as error:
            raise Unauthenticated(str(error)) from None
        return Identity(token_identity(claims.iss, claims.sub), "token")

    def is_admin(self, identity):
        return matches(identity, self.admins)

    def check_job(self, identity, job, action):
        """Raise Forbidden unless identity may `action` ("see", "cancel") job: its own, or any for admins."""
        if not self.enabled or self.is_admin(identity) or job.submitter == identity.name:
            return
        raise Forbidden(f"job {job.job_id} was submitted by someone else; you may not {action} it")

    def check_stager(self, request):
        """Raise Forbidden when stager_dns is set and the caller's certificate DN is not one of them."""
        if not self.stager_dns:
            return
        dn = x509.peer_dn(request)
        if dn not in self.stager_dns:
            raise Forbidden("staging reports are accepted only from the configured stagers' certificates")
