"""The v1 API over HTTP(S), and every way a request can fail told as one CLIError.

Requests that are safe to repeat (GETs, DELETE, and a batch POST carrying
its submission_id) are sent again when their answer was lost or the server
said it is busy (429, 502, 503, 504, honouring Retry-After); a connection
that cannot be made at all is retried only once the server has answered in
this run, so a wrong URL fails at once.
"""

import dataclasses
import json
import re
import time
import urllib.parse

import requests
from requests.adapters import HTTPAdapter

from transferd import __version__
from transferd.cli import credentials as credentials_module
from transferd.cli.errors import CREDENTIALS, UNREACHABLE, USAGE, CLIError, exit_code_for_status

DEFAULT_URL = "http://127.0.0.1:8080"
BUSY = frozenset({429, 502, 503, 504})
RETRY_DELAYS = (0.5, 1, 2, 4)  # seconds before each repetition
MAX_RETRY_AFTER = 30  # seconds: a longer Retry-After is cut to this


class _Bearer(requests.auth.AuthBase):
    """Sends the token; being an auth object, it also keeps ~/.netrc from replacing it."""

    def __init__(self, token):
        self.token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


class _ContextAdapter(HTTPAdapter):
    """An adapter whose TLS connections use our SSL context (grid CA directory, certificate or proxy)."""

    def __init__(self, ssl_context):
        self.ssl_context = ssl_context
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self.ssl_context
        return super().init_poolmanager(*args, **kwargs)


class Client:
    """One server, one session (connections are kept alive between requests)."""

    def __init__(self, url, credentials, timeout=60.0, sleep=time.sleep):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise CLIError(f"--url {url!r} is not an http:// or https:// URL", USAGE)
        self.url = url.rstrip("/")
        if parsed.scheme == "http":  # a certificate needs TLS: only a token can be sent
            credentials = dataclasses.replace(credentials, certificate=None)
        self.credentials = credentials  # what is presented
        self.timeout = timeout
        self.sleep = sleep
        self.reached = False  # the server has answered at least once in this run
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"transferctl/{__version__}"
        if credentials.token is not None:
            self.session.auth = _Bearer(credentials.token.value)
        if parsed.scheme == "https":
            self.session.mount("https://", _ContextAdapter(credentials_module.tls_context(credentials)))
            self.session.verify = credentials.ca_dir or True

    def close(self):
        self.session.close()

    # -- requests --------------------------------------------------------------

    def call(self, method, path, params=None, body=None, repeatable=None):
        """The decoded JSON answer of a successful request; a CLIError for any other outcome."""
        response = self._send(method, path, params=params, body=body, repeatable=repeatable)
        return self._decode(response, response.content)

    def lines(self, path, params=None):
        """Each JSON line of a streamed answer (Accept: application/x-ndjson), as it arrives."""
        response = self._send("GET", path, params=params, headers={"Accept": "application/x-ndjson"}, stream=True)
        with response:
            if response.status_code != 200:
                self._decode(response, response.content)
            try:
                for line in response.iter_lines():
                    if line.strip():
                        yield self._json(response, line)
            except requests.RequestException as error:
                raise self._transport_error(error) from None

    def _send(self, method, path, params=None, body=None, headers=None, stream=False, repeatable=None):
        if repeatable is None:
            repeatable = method in ("GET", "DELETE")
        for attempt in range(len(RETRY_DELAYS) + 1):
            last = attempt == len(RETRY_DELAYS)
            try:
                response = self.session.request(method, self.url + path, params=params, json=body,
                                                headers=headers, timeout=self.timeout, stream=stream)
            except requests.RequestException as error:
                if last or not repeatable or not self._worth_repeating(error):
                    raise self._transport_error(error) from None
                self.sleep(RETRY_DELAYS[attempt])
                continue
            self.reached = True
            if response.status_code in BUSY and repeatable and not last:
                response.close()
                self.sleep(_retry_after(response, RETRY_DELAYS[attempt]))
                continue
            return response

    def _worth_repeating(self, error):
        if isinstance(error, (requests.exceptions.SSLError, requests.exceptions.InvalidURL)):
            return False
        if isinstance(error, requests.exceptions.ConnectTimeout):
            return self.reached
        if isinstance(error, requests.ConnectionError) and _never_connected(error):
            return self.reached
        return isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))

    # -- answers ---------------------------------------------------------------

    def _decode(self, response, content):
        if 200 <= response.status_code < 300:
            return self._json(response, content)
        raise self.http_error(response.status_code, _problem(content), response)

    def _json(self, response, content):
        try:
            return json.loads(content)
        except ValueError:
            raise CLIError(f"{self.url} answered {response.status_code} with something that is not JSON "
                           f"({_snippet(content)}): is this transferd?", UNREACHABLE) from None

    def http_error(self, status, problem, response=None):
        """The CLIError for an error answer (also used for one item of a batch)."""
        title = problem.get("title") or (response.reason if response is not None else "") or "error"
        detail = problem.get("detail") or problem.get("msg") or ""
        said = f"{title}: {detail}" if detail and detail != title else title
        if status == 401:
            if self.credentials.token is None and self.credentials.certificate is None:
                return CLIError(f"transferd wants a credential and none was found (401): {_credential_hint(self)}",
                                CREDENTIALS)
            return CLIError(f"transferd did not accept the {self.credentials.describe()} (401 {said})", CREDENTIALS)
        if status == 403:
            return CLIError(f"not allowed (403 {said})", exit_code_for_status(status))
        if status >= 500 or status == 429:
            wait = response.headers.get("Retry-After") if response is not None else None
            later = f"; try again in {wait} s" if wait else "; try again later"
            return CLIError(f"transferd at {self.url} is unavailable ({status} {said}){later}",
                            exit_code_for_status(status))
        return CLIError(f"{status} {said}", exit_code_for_status(status))

    def _transport_error(self, error):
        if isinstance(error, requests.exceptions.SSLError):
            return self._tls_error(error)
        if isinstance(error, requests.Timeout):
            return CLIError(f"transferd at {self.url} did not answer within {self.timeout:g} s", UNREACHABLE)
        if isinstance(error, requests.ConnectionError) and _never_connected(error):
            return CLIError(f"cannot reach transferd at {self.url}: {_os_reason(error)} "
                            "(is it running? set --url or TRANSFERD_URL)", UNREACHABLE)
        return CLIError(f"lost the connection to transferd at {self.url}: {_os_reason(error)}", UNREACHABLE)

    def _tls_error(self, error):
        text = str(error)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            reason = re.search(r"certificate verify failed: ([^(]+)", text)
            where = f"X509_CERT_DIR={self.credentials.ca_dir}" if self.credentials.ca_dir else "the system's CAs"
            return CLIError(f"cannot verify the certificate of {self.url}"
                            f"{': ' + reason.group(1).strip() if reason else ''} (checked against {where})",
                            UNREACHABLE)
        alert = re.search(r"alert ([a-z ]+)", text)
        if alert:  # the server ended the handshake: it did not accept what we presented
            return CLIError(f"transferd at {self.url} refused the TLS handshake with {self.credentials.describe()} "
                            f"({alert.group(1).strip()})", CREDENTIALS)
        return CLIError(f"TLS with {self.url} failed: {_os_reason(error)}", UNREACHABLE)


def _credential_hint(client):
    if client.url.startswith("https://"):
        return ("present a certificate or proxy (X509_USER_PROXY, /tmp/x509up_u<uid>, ~/.globus/usercert.pem) "
                "or a token (BEARER_TOKEN, BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>, /tmp/bt_u<uid>)")
    return "certificates need an https:// URL; a token goes in BEARER_TOKEN or BEARER_TOKEN_FILE"


def _problem(content):
    """The fields of an RFC 9457 problem (or of a prototype error), {} when the body is no JSON object."""
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _retry_after(response, default):
    try:
        return min(float(response.headers.get("Retry-After", default)), MAX_RETRY_AFTER)
    except ValueError:
        return default


def _never_connected(error):
    """True when the connection was never made (so the request was never sent)."""
    reason = error.args[0] if error.args else None
    reason = getattr(reason, "reason", reason)
    return type(reason).__name__ in ("NewConnectionError", "NameResolutionError", "ConnectTimeoutError")


def _os_reason(error):
    """The system's words for a failure ("Connection refused"), dug out of urllib3's wrapping."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\] ([^)\]'\"]+)", text)
    if found:
        return found.group(1).strip()
    found = re.search(r"(RemoteDisconnected|ConnectionResetError|IncompleteRead)\(([^)]*)\)", text)
    if found:
        return found.group(2).strip("'\" ") or found.group(1)
    return text


def _snippet(content, length=80):
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
    text = " ".join(text.split())
    return text[:length] + ("..." if len(text) > length else "")
