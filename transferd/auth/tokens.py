"""Bearer tokens following the WLCG Common JWT Profile: who sent this request?

A token is accepted when:
* it is a compact JWS of at most MAX_TOKEN_CHARS, signed with RS256 or ES256:
  any other alg (none, HS256...) is refused before a key is looked at, so an
  HS256 token keyed with an issuer's public key (the classic confusion
  attack) never reaches a verifier;
* its iss is one of the trusted issuers, and the key that verifies it is
  from that issuer's own JWKS: the one named by the token's kid, whose type
  fits the alg.  The WLCG profile requires a kid; a token without one is
  refused, unless its issuer is trusted with kid_optional (then the issuer's
  only key of that type verifies it);
* it carries exp, iss, sub and aud; exp and nbf/iat (when present) hold, with
  LEEWAY seconds of clock skew; aud names one of our audiences;
* its wlcg.ver, when present, is 1.x (the profile: reject unknown majors).

The identity is the (iss, sub) pair (TokenIdentity).  The profile also asks
issuers for iat, jti and wlcg.ver; those are not required here, so that
tokens of other JWT issuers (SciTokens, plain OIDC) can be accepted too.

Keys come from a JWKS per issuer: a file, read at once and again whenever it
changes (checked at each token), or an http(s) URL, fetched with treq (never
blocking the reactor) at start, every `refresh` seconds, and when a token
names a kid the issuer's keys lack -- at most once a REFETCH_INTERVAL per
issuer, so a flood of junk kids cannot hammer the IdP.  A JWKS that cannot
be loaded leaves the last good keys in use and is logged.  Keys that are not
RSA (2048 bits or more) or EC P-256 signing keys are ignored.  Headers that
point elsewhere for keys (jku, x5u) are never followed.
"""

import json
import re
from typing import NamedTuple

import jwt
from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from transferd.config import ConfigError
from transferd.http import HTTPClient, Timeout, describe
from transferd.interfaces import IReconfigurable
from transferd.tls import WatchedFile, client_tls_policy

ALGORITHMS = ("RS256", "ES256")  # the profile's algorithms; asymmetric only
REQUIRED_CLAIMS = ("exp", "iss", "sub", "aud")
LEEWAY = 60  # seconds of clock skew tolerated on exp, nbf and iat (the profile's recommended value)
MAX_TOKEN_CHARS = 16 * 1024  # WLCG tokens are a few hundred bytes; anything this long is junk
MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT = 30.0  # seconds a whole JWKS download may take
REFETCH_INTERVAL = 60.0  # at least this long between two fetches of one issuer's JWKS
MIN_RSA_BITS = 2048
_KEY_ALGORITHM = {"RSA": "RS256", "EC": "ES256"}  # JWK kty -> the only alg we use it for
_WLCG_VERSION = re.compile(r"1\.[0-9]+")


class TokenError(Exception):
    """The token is refused; the message is safe to show to the client (it never holds the token)."""


class JWKSError(ValueError):
    """A JWKS document (or its download) cannot be used."""


class TrustedIssuer(NamedTuple):
    """A trusted issuer's JWKS (an http(s) URL or a file), and whether its tokens may omit kid."""

    jwks: str
    kid_optional: bool = False


class TokenIdentity(NamedTuple):
    """Who a token speaks for: the subject as named by its issuer."""

    iss: str
    sub: str


def _shown(value, limit=100):
    """A value taken from a token, fit for a message or a log line: printable and cut short."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[:limit] + "..."


def _signing_key(jwk):
    """The PyJWK for one JWKS entry if it is an RS256 or ES256 public signing key, else None (ignored)."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or "d" in jwk:  # "d": private key material
        return None
    kty = jwk.get("kty")
    alg = _KEY_ALGORITHM.get(kty)
    if alg is None or jwk.get("alg", alg) != alg or (kty == "EC" and jwk.get("crv") != "P-256"):
        return None
    if not isinstance(jwk.get("kid", ""), str):
        return None
    try:
        key = jwt.PyJWK(jwk, alg)
    except jwt.PyJWTError:
        return None
    if kty == "RSA" and key.key.key_size < MIN_RSA_BITS:
        return None
    return key


def parse_jwks(data):
    """The usable signing keys (a tuple of PyJWK) of a JWKS document (bytes); JWKSError if there are none."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise JWKSError("the JWKS is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JWKSError('the JWKS is not a JSON object with a "keys" list')
    keys = tuple(key for key in map(_signing_key, document["keys"]) if key is not None)
    if not keys:
        raise JWKSError("the JWKS holds no RS256 or ES256 signing key")
    return keys


def _unverified(token):
    """The (header, claims) of a token, not yet verified: only to choose the issuer and key."""
    if not isinstance(token, str):
        raise TokenError("the bearer token must be text")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError(f"the bearer token is longer than {MAX_TOKEN_CHARS} characters")
    if token.count(".") != 2:
        raise TokenError("the bearer token is not a JWT (three base64url parts separated by dots)")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise TokenError("the bearer token is not a well-formed JWT") from None
    return header, claims


class _Issuer:
    """A trusted issuer: where its JWKS is, its last good keys, and the state of their loading."""

    def __init__(self, iss, source, kid_optional=False):
        self.iss = iss
        self.source = source
        self.kid_optional = kid_optional
        self.url = source.startswith(("https://", "http://"))
        self.file = None if self.url else WatchedFile(source)
        self.keys = None  # tuple of PyJWK once loaded
        self.data = None  # the file's bytes last parsed (good or not), so that a change is parsed once
        self.problem = None  # the last loading problem logged, so that it is logged once
        self.fetching = None  # the Deferred of the download in flight
        self.last_fetch = None  # clock time the last download started

    def find(self, kid, alg):
        """The key to verify an alg token naming kid (or no kid) with; None if the keys have none."""
        if self.keys is None:
            return None
        if kid is None:
            fitting = [key for key in self.keys if key.algorithm_name == alg]
            if len(fitting) > 1:
                raise TokenError(f"the token names no key (kid) and issuer {self.iss} has several {alg} keys")
            return fitting[0] if fitting else None
        named = [key for key in self.keys if key.key_id == kid]
        for key in named:
            if key.algorithm_name == alg:
                return key
        if named:
            raise TokenError(f"the key {_shown(kid)} of issuer {self.iss} is not an {alg} key")
        return None

    def missing(self, kid, alg):
        """Why find() found no key."""
        if self.keys is None:
            return f"the keys of issuer {self.iss} are not available yet; try again later"
        if kid is None:
            return f"issuer {self.iss} has no {alg} key"
        return f"the token's key {_shown(kid)} is not among the keys of issuer {self.iss}"


@implementer(IReconfigurable)
class TokenVerifier(service.MultiService):
    """Verifies bearer tokens against the keys of the trusted issuers; a service that keeps the keys current."""

    log = Logger()

    def __init__(self, issuers, audiences, reactor, clock, refresh=3600.0, fetch_timeout=FETCH_TIMEOUT, metrics=None):
        """issuers: {iss: JWKS source}, a source being an http(s) URL or a file name.
        audiences: the aud values that mean this service; a token must name one of them.
        reactor: downloads the JWKS URLs (verifying https against the system's CAs).
        clock: times the refresh, the rate limit and download timeouts (the reactor, or a Clock in tests).
        refresh: seconds between two downloads of each JWKS URL (and checks of each file).
        """
        super().__init__()
        if not audiences:
            raise ValueError("bearer tokens need at least one accepted audience ([auth] token_audiences)")
        self.audiences = tuple(audiences)
        self.clock = clock
        self.fetch_timeout = fetch_timeout
        trusted = {iss: spec if isinstance(spec, TrustedIssuer) else TrustedIssuer(spec) for iss, spec in issuers.items()}
        self._issuers = {iss: _Issuer(iss, spec.jwks, spec.kid_optional) for iss, spec in trusted.items()}
        self.http = HTTPClient(reactor, clock, timeout=fetch_timeout, tls_policy=client_tls_policy(),
                               max_body=MAX_JWKS_BYTES, headers={"Accept": "application/json"}, service="token_issuer",
                               metrics=metrics)
        timer = TimerService(refresh, self.refresh)
        timer.clock = clock
        timer.setServiceParent(self)

    def reconfigure(self, config):
        """New [auth] token_issuers and token_audiences, at once.  An issuer kept as it was keeps its keys; a new
        one's keys are loaded now (its tokens are refused until they are)."""
        issuers, audiences = config.auth.token_issuers, tuple(config.auth.token_audiences)
        if not issuers or not audiences:
            raise ConfigError("[auth] token_issuers: turning bearer tokens off needs a restart")
        kept = {}
        for iss, spec in issuers.items():
            old = self._issuers.get(iss)
            same = old is not None and (old.source, old.kid_optional) == (spec.jwks, spec.kid_optional)
            kept[iss] = old if same else _Issuer(iss, spec.jwks, spec.kid_optional)
        for iss, old in self._issuers.items():
            if kept.get(iss) is not old and old.fetching is not None:
                old.fetching.cancel()
        self._issuers, self.audiences = kept, audiences
        if self.running:
            self.refresh()

    def stopService(self):
        """Cancel the downloads in flight, stop the refresh, close our connections."""
        for issuer in self._issuers.values():
            if issuer.fetching is not None:
                issuer.fetching.cancel()
        stopped = super().stopService()
        stopped.addCallback(lambda _: self.http.stop())
        return stopped

    async def verify(self, token):
        """The TokenIdentity of a valid bearer token (the text after "Bearer "); TokenError otherwise."""
        header, claims = _unverified(token)
        alg = header.get("alg")
        if alg is None:
            raise TokenError("the token's header names no signing algorithm (alg)")
        if alg not in ALGORITHMS:
            raise TokenError(f"the token is signed with {_shown(alg)}; only RS256 and ES256 are accepted")
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise TokenError("the token names no issuer (iss)")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise TokenError(f"the token's issuer {_shown(iss)} is not trusted here")
        kid = header.get("kid")
        if kid is None and not issuer.kid_optional:
            raise TokenError(f"the token names no key (kid), which the WLCG token profile requires; issuer"
                             f" {issuer.iss} is not configured to omit it")
        key = await self._key(issuer, kid, alg)
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=list(self.audiences), issuer=iss,
                                leeway=LEEWAY, options={"require": list(REQUIRED_CLAIMS)})
        except jwt.PyJWTError as error:
            raise TokenError(self._reason(error)) from None
        if not claims["sub"]:
            raise TokenError("the token's subject (sub) is empty")
        version = claims.get("wlcg.ver")
        if version is not None and not (isinstance(version, str) and _WLCG_VERSION.fullmatch(version)):
            raise TokenError(f"the token follows WLCG profile version {_shown(version)}; only 1.x is understood")
        return TokenIdentity(iss, claims["sub"])

    def refresh(self):
        """Check every JWKS file and download every JWKS URL; fires when done, never fails (a TimerService body)."""
        downloads = []
        for issuer in self._issuers.values():
            if issuer.url:
                downloads.append(self._fetch(issuer))
            else:
                self._read_file(issuer)
        return defer.gatherResults(downloads)

    # -- internals --------------------------------------------------------

    def _reason(self, error):
        """The client's message for a PyJWT refusal."""
        if isinstance(error, jwt.ExpiredSignatureError):
            return "the bearer token has expired"
        if isinstance(error, jwt.ImmatureSignatureError):
            return "the bearer token is not valid yet (its nbf or iat is in the future)"
        if isinstance(error, jwt.InvalidAudienceError):
            return f"the token's audience does not include this service ({', '.join(self.audiences)})"
        if isinstance(error, jwt.MissingRequiredClaimError):
            return f"the token has no {error.claim} claim"
        if isinstance(error, jwt.InvalidSignatureError):
            return "the token's signature does not verify"
        return f"the bearer token is not valid: {error}"  # PyJWT's own words never quote the token

    async def _key(self, issuer, kid, alg):
        """The key of issuer to verify the token with; the keys are reloaded or fetched again if they lack it."""
        if issuer.file is not None:
            self._read_file(issuer)
        key = issuer.find(kid, alg)
        if key is None and issuer.url and (issuer.fetching is not None or self._may_fetch(issuer)):
            await self._fetch(issuer)
            key = issuer.find(kid, alg)
        if key is None:
            raise TokenError(issuer.missing(kid, alg))
        return key

    def _may_fetch(self, issuer):
        return issuer.last_fetch is None or self.clock.seconds() - issuer.last_fetch >= REFETCH_INTERVAL

    def _read_file(self, issuer):
        """Use the JWKS file's keys if it changed; a file that cannot be read or used keeps the last good keys."""
        try:
            data = issuer.file.read()
        except OSError as error:
            self._failed(issuer, f"cannot read {issuer.source}: {error.strerror}")
            return
        if data == issuer.data:
            return
        issuer.data = data
        try:
            keys = parse_jwks(data)
        except JWKSError as error:
            self._failed(issuer, f"{issuer.source}: {error}")
            return
        self._loaded(issuer, keys)

    def _fetch(self, issuer):
        """Download the issuer's JWKS, or join the download in flight; fires None when it is over."""
        fetching = issuer.fetching
        if fetching is None:
            issuer.last_fetch = self.clock.seconds()
            fetching = issuer.fetching = defer.Deferred.fromCoroutine(self._download_keys(issuer))

            def over(_):
                issuer.fetching = None

            fetching.addBoth(over)
        # Each waiter gets its own Deferred, so that one giving up (cancelled: its client went away)
        # does not cancel the download the others wait for.
        waiter = defer.Deferred()
        fetching.addBoth(lambda _: waiter.callback(None))
        return waiter

    async def _download_keys(self, issuer):
        try:
            keys = parse_jwks(await self._download(issuer.source))
        except defer.CancelledError:
            return  # stopService
        except Exception as error:
            self._failed(issuer, f"cannot use {issuer.source}: {describe(error)}")
            return
        self._loaded(issuer, keys)

    async def _download(self, url):
        """The body of a 200 answer to GET url, read whole within fetch_timeout and MAX_JWKS_BYTES.

        No redirects: the profile wants the keys over verified HTTPS, and a redirect could leave it.
        """
        try:
            answer = await self.http.request("GET", url)
        except Timeout as timeout:
            raise JWKSError(str(timeout)) from None
        if answer.code != 200:
            raise JWKSError(f"HTTP {answer.code}")
        return answer.body

    def _loaded(self, issuer, keys):
        kids = [key.key_id for key in keys]
        if issuer.keys is None or issuer.problem is not None or kids != [key.key_id for key in issuer.keys]:
            self.log.info("token issuer {iss}: {count} signing keys loaded from {source} (kid {kids})",
                          iss=issuer.iss, count=len(keys), source=issuer.source, kids=", ".join(map(str, kids)))
        issuer.keys = keys
        issuer.problem = None

    def _failed(self, issuer, problem):
        """Log a loading problem once (until it changes or the keys load again); the last good keys stay."""
        if problem == issuer.problem:
            return
        issuer.problem = problem
        if issuer.keys is None:
            self.log.warn("token issuer {iss}: {problem}; its tokens are refused until its keys can be loaded",
                          iss=issuer.iss, problem=problem)
        else:
            self.log.warn("token issuer {iss}: {problem}; keeping the {count} keys loaded before",
                          iss=issuer.iss, problem=problem, count=len(issuer.keys))
