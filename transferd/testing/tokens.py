"""A token issuer (IdP) for tests and demos: key pairs, their JWKS, WLCG-style JWTs, and a JWKS server.

    issuer = TokenIssuer("https://idp.example.org", kind="rsa")   # or "ec" (ES256)
    token = issuer.token(sub="alice", aud="https://transferd.example.org")
    issuer.write_jwks(path)          # a JWKS file, replaced atomically
    server = JWKSServer(issuer, reactor)
    url = await server.start()       # http://127.0.0.1:PORT/jwk, answering the issuer's current JWKS
    issuer.rotate()                  # a new key pair and kid; the server publishes it from now on
    server.requests                  # how many times the JWKS was asked for
    await server.stop()

Tokens the verifier must refuse come from the same issuer: hs256_token() (HMAC
keyed with the public key PEM: the algorithm confusion attack), none_token()
(alg "none") and tampered_token() (a valid signature over other claims);
compact() assembles any header and claims into a JWS with a given signature.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server

from transferd.testing.servers import QuietSite, TrackingFactory

AUDIENCE = "https://transferd.example.org"


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(header, claims, signature=b""):
    """The compact JWS "header.claims.signature" of two dicts and signature bytes, signed or not."""
    return ".".join((_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)))


class TokenIssuer:
    """An issuer with one key pair (RSA 2048 / RS256, or EC P-256 / ES256) and a kid."""

    def __init__(self, iss, kind="rsa", kid=None):
        if kind not in ("rsa", "ec"):
            raise ValueError(f"kind must be 'rsa' or 'ec', not {kind!r}")
        self.iss = iss
        self.kind = kind
        self.alg = "RS256" if kind == "rsa" else "ES256"
        self.rotate(kid)

    def rotate(self, kid=None):
        """Replace the key pair and kid, as an IdP rotating its key: the old key is no longer published."""
        if self.kind == "rsa":
            self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.kid = kid or f"{self.kind}-{secrets.token_hex(4)}"

    def jwk(self):
        """The public key as a JWK, as an IdP publishes it."""
        algorithm = RSAAlgorithm if self.kind == "rsa" else ECAlgorithm
        jwk = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg=self.alg)
        return jwk

    def jwks(self):
        return {"keys": [self.jwk()]}

    def write_jwks(self, path):
        """Write the JWKS to path through a temporary file and a rename, as a key distribution tool would."""
        temporary = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self.jwks(), handle)
        os.replace(temporary, path)

    def public_pem(self):
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def claims(self, sub="alice", aud=AUDIENCE, lifetime=600, now=None, extra=None):
        """The claims of a WLCG access token issued at now (default: the current time).

        extra adds or replaces claims; a None value removes the claim.
        """
        now = int(time.time() if now is None else now)
        claims = {"wlcg.ver": "1.0", "iss": self.iss, "sub": sub, "aud": aud, "iat": now, "nbf": now,
                  "exp": now + int(lifetime), "jti": str(uuid.uuid4()), "scope": "storage.read:/"}
        claims.update(extra or {})
        return {name: value for name, value in claims.items() if value is not None}

    def header(self, alg=None, headers=None):
        """A JOSE header naming our kid; headers adds or replaces fields, a None value removes one."""
        header = {"alg": alg or self.alg, "typ": "JWT", "kid": self.kid}
        header.update(headers or {})
        return {name: value for name, value in header.items() if value is not None}

    def token(self, headers=None, **claims):
        """A token signed with our key; claims are the arguments of claims()."""
        return self._signed(self.claims(**claims), headers)

    def _signed(self, payload, headers=None):
        header = self.header(headers=headers)
        return jwt.encode(payload, self.private_key, algorithm=header.pop("alg"), headers=header)

    def hs256_token(self, **claims):
        """An HS256 token keyed with our public key's PEM: valid if a verifier lets the token pick the algorithm."""
        header, payload = self.header("HS256"), self.claims(**claims)
        signing_input = compact(header, payload).rsplit(".", 1)[0].encode("ascii")
        return compact(header, payload, hmac.new(self.public_pem(), signing_input, hashlib.sha256).digest())

    def none_token(self, **claims):
        """An unsigned token (alg "none")."""
        return compact(self.header("none"), self.claims(**claims))

    def tampered_token(self, **claims):
        """A token signed by us whose claims were then changed (sub "mallory"): the signature no longer fits."""
        payload = self.claims(**claims)
        header, _, signature = self._signed(payload).split(".")
        return ".".join((header, _b64(json.dumps(dict(payload, sub="mallory")).encode()), signature))


class _JWKSResource(resource.Resource):
    isLeaf = True

    def __init__(self, server):
        super().__init__()
        self.server = server

    def render_GET(self, request):
        if request.path != b"/jwk":
            request.setResponseCode(404)
            return b"not found\n"
        return self.server.answer(request)


class JWKSServer:
    """An IdP's JWKS endpoint on 127.0.0.1 (a free port): GET /jwk answers the issuer's current JWKS."""

    def __init__(self, issuer, reactor):
        self.reactor = reactor
        self.issuer = issuer
        self.requests = 0  # GET /jwk received
        self.hanging = []  # requests left unanswered by hang()
        self._forced = None  # (status, body) answered instead of the JWKS, or "hang"
        self._connections = TrackingFactory(QuietSite(_JWKSResource(self)))
        self.port = None
        self.url = None

    async def start(self):
        """Listen; fire with the JWKS URL."""
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(self._connections)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/jwk"
        return self.url

    def stop(self):
        """Stop listening and close every open connection; fires when all are gone."""
        port, self.port = self.port, None
        return self._connections.close_all(port)

    def respond(self, status, body=b""):
        """Answer status and body to every request from now on (e.g. 503: the IdP is down), until recover()."""
        self._forced = (status, body)

    def hang(self):
        """Leave every request from now on unanswered, until recover()."""
        self._forced = "hang"

    def recover(self):
        """Serve the JWKS again."""
        self._forced = None

    def answer(self, request):
        self.requests += 1
        if self._forced == "hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if self._forced is not None:
            status, body = self._forced
            request.setResponseCode(status)
            return body
        request.setHeader("Content-Type", "application/json")
        return json.dumps(self.issuer.jwks()).encode()
