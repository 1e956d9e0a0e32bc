"""A client of one WLCG Tape REST API v1 endpoint (dCache, CTA/EOS, StoRM...).

Where the API is (`[stager] url`)
    A URL without a path (``https://tape.example.org:8443`` or with a lone
    ``/``) names the site: the v1 endpoint is discovered from
    ``<url>/.well-known/wlcg-tape-rest-api`` (the entry of ``"endpoints"``
    whose ``"version"`` is ``"v1"``) and cached for the life of the process.
    A URL with a path (``https://tape.example.org:8443/api/v1``) is the
    endpoint itself and is used as it is.

Where products are (`[stager] archive_root`)
    The namespace is the absolute directory of the tape namespace that holds
    the products: product ``P`` is ``<namespace>/P``, a file or a directory
    whose files are staged (transferd.stagers.taperest says how they are
    listed); product_files() finds them in a request's answer by path.

Credentials
    A bearer token read from token_file (read again whenever the file
    changes), and/or an X.509 client certificate in the TLS policy
    (transferd.tls.client_tls_policy: cert and key, or a proxy, and ca_path
    to verify the server).

Failures come in two kinds: Unreachable (no connection, a timeout, 5xx, 408,
425 or 429: it may pass) and Refused (any other 4xx, with the RFC 7807 title
and detail of the answer).
"""

import os
import posixpath
import re
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from transferd.http import HTTPClient, Timeout, describe
from transferd.tls import WatchedFile

WELL_KNOWN = "/.well-known/wlcg-tape-rest-api"
API_VERSION = "v1"
REQUEST_TIMEOUT = 60.0  # seconds one HTTP exchange (answer and body) may take
RETRYABLE_STATUS = frozenset({408, 425, 429})
SPLITTABLE_STATUS = frozenset({400, 409, 413, 422})  # a batch refused so may be sent again file by file


class Unreachable(Exception):
    """The endpoint could not be reached, or answered in a way that may pass (5xx, timeout)."""


class Refused(Exception):
    """The endpoint refused the request for good (4xx); the message says why.

    splittable: a batch refused this way may be tried again file by file.
    """

    def __init__(self, message, splittable=False):
        super().__init__(message)
        self.splittable = splittable


def document(answer):
    """The answer's JSON body, or None when it is not JSON."""
    try:
        return answer.json()
    except ValueError:
        return None


def problem(answer):
    """The RFC 7807 title and detail (or the start of the body) as one sentence."""
    data = document(answer)
    if isinstance(data, dict) and (data.get("title") or data.get("detail")):
        return ": ".join(str(data[key]).strip() for key in ("title", "detail") if data.get(key))
    text = answer.body.decode("utf-8", "replace").strip()
    return text[:200] if text else "no details given"


def retryable(answer):
    return answer.code >= 500 or answer.code in RETRYABLE_STATUS


def normalize(path):
    """Compare tape paths as the servers do: runs of '/' collapsed, '.' and '..' resolved."""
    return posixpath.normpath(re.sub("/+", "/", path)) if path else path


class TapeRestClient:
    """Calls one Tape REST endpoint: discovery, the bearer token, problem details.

    url: the site URL or the endpoint (see the module docstring).
    namespace: the absolute tape directory holding the products.
    reactor, clock: do the network I/O, and time it out.
    tls_policy: an IPolicyForHTTPS (transferd.tls.ClientTLSPolicy) for https URLs.
    connections: persistent connections kept to the endpoint (the poller's concurrency).
    """

    log = Logger()

    def __init__(self, url, namespace, reactor, clock, token_file=None, tls_policy=None,
                 request_timeout=REQUEST_TIMEOUT, connections=8, metrics=None):
        self.url = url.rstrip("/")
        self.namespace = normalize(namespace).rstrip("/")
        self.tls_policy = tls_policy
        self.request_timeout = request_timeout
        self.http = HTTPClient(reactor, clock, timeout=request_timeout, tls_policy=tls_policy, per_host=connections,
                               headers={"Accept": "application/json"}, service="taperest", metrics=metrics)
        self._token = WatchedFile(token_file) if token_file else None
        # A site URL (no path) is discovered; any other URL is the endpoint itself.
        self._endpoint_url = None if urlsplit(self.url).path in ("", "/") else self.url

    def reconfigure_credentials(self, token_file, cert, key):
        """Other [stager] token_file, cert and key (SIGHUP): checked first (ConfigError), then used at once."""
        from transferd.config import ConfigError
        from transferd.tls import reconfigure_client_credential

        if token_file and not os.path.isfile(token_file):
            raise ConfigError(f"[stager] token_file {token_file!r} is not a file")
        if reconfigure_client_credential(self.tls_policy, cert, key, "[stager] cert/key"):
            self.http.pool.closeCachedConnections()  # the next connection presents the new certificate
        if token_file != (self._token.path if self._token is not None else None):
            self._token = WatchedFile(token_file) if token_file else None

    @property
    def shown(self):
        """The endpoint as known so far (the site URL before discovery), for messages."""
        return self._endpoint_url or self.url

    def path_for(self, product_id):
        """The Tape REST path of a product: <namespace>/<product_id>."""
        return f"{self.namespace}/{product_id}"

    def relative(self, path):
        """A path of the namespace relative to it (so starting with the product's name)."""
        return normalize(path)[len(self.namespace) + 1:]

    def product_files(self, found, product_id):
        """{path: file entry} of the files of a GET /stage/<id> answer that belong to the product.

        They are the product's path itself (a file product) and every path
        under it; paths are normalized as the servers compare them.
        """
        product = normalize(self.path_for(product_id))
        entries = found.get("files") if isinstance(found, dict) else None
        mine = {}
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                path = normalize(entry["path"])
                if path == product or path.startswith(product + "/"):
                    mine[path] = entry
        return mine

    async def post_paths(self, what, tail, paths, job_id):
        """POST {"paths": paths} to <endpoint><tail> (a cancel, a release), best effort: log, never raise."""
        try:
            answer = await self.call("POST", tail, {"paths": list(paths)})
            if not 200 <= answer.code < 300:
                self.log.warn("job {job_id}: Tape REST {what} answered HTTP {code}: {why}", job_id=job_id,
                              what=what, code=answer.code, why=problem(answer))
        except defer.CancelledError:
            pass
        except Exception as error:
            self.log.warn("job {job_id}: Tape REST {what} failed: {error}", job_id=job_id, what=what, error=error)

    def stop(self):
        """Cancel the calls in flight and close the connections."""
        return self.http.stop()

    async def endpoint(self):
        """The v1 endpoint URL (no trailing slash), discovered once and cached."""
        if self._endpoint_url is not None:
            return self._endpoint_url
        where = self.url + WELL_KNOWN
        answer = await self._call("GET", where)
        if retryable(answer):
            raise Unreachable(f"discovery at {where} answered HTTP {answer.code}: {problem(answer)}")
        found = document(answer)
        if answer.code != 200 or not isinstance(found, dict):
            raise Refused(f"no WLCG Tape REST API at {where} (HTTP {answer.code}: {problem(answer)})")
        offered = [e for e in found.get("endpoints") or () if isinstance(e, dict)]
        for entry in offered:
            if entry.get("version") == API_VERSION and isinstance(entry.get("uri"), str):
                self._endpoint_url = urljoin(where, entry["uri"]).rstrip("/")
                self.log.info("Tape REST endpoint discovered: {endpoint}", endpoint=self._endpoint_url)
                return self._endpoint_url
        versions = ", ".join(str(e.get("version")) for e in offered) or "none"
        raise Refused(f"{where} offers no {API_VERSION} Tape REST endpoint (versions offered: {versions})")

    async def call(self, method, tail, body=None):
        """One exchange with <endpoint><tail>; fire with the Answer, raise Unreachable when there is none."""
        return await self._call(method, await self.endpoint() + tail, body)

    async def stage(self, paths):
        """POST /stage for paths: one try; return the request id, raise Unreachable or Refused."""
        answer = await self.call("POST", "/stage", {"files": [{"path": path} for path in paths]})
        if retryable(answer):
            raise Unreachable(f"HTTP {answer.code}: {problem(answer)}")
        if not 200 <= answer.code < 300:
            raise Refused(f"the Tape REST endpoint {self.shown} refused the staging request "
                          f"(HTTP {answer.code}): {problem(answer)}", splittable=answer.code in SPLITTABLE_STATUS)
        found = document(answer)
        if isinstance(found, dict) and isinstance(found.get("requestId"), str) and found["requestId"]:
            return found["requestId"]
        location = answer.header("location").rstrip("/")
        if location:
            return location.rsplit("/", 1)[-1]
        raise Refused(f"the Tape REST endpoint accepted the staging request (HTTP {answer.code}) "
                      "but gave no request id")

    async def _call(self, method, url, body=None):
        headers = {}
        if self._token is not None:
            try:
                token = self._token.read().decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                raise Unreachable(f"cannot read the token file {self._token.path}: {error}") from None
            headers["Authorization"] = "Bearer " + token
        try:
            return await self.http.request(method, url, json=body, headers=headers)
        except defer.CancelledError:
            raise
        except Timeout as error:
            raise Unreachable(f"{method} {url} got no answer within {error.seconds:g}s") from None
        except Exception as error:
            raise Unreachable(f"{method} {url} failed: {describe(error)}") from None
