"""The embedded mover: copies to file:// destinations, PUTs to http(s):// and davs:// ones.

It runs transfers in-line (transfer() fires with the outcome), so transferd
needs no FTS3 for local delivery, demos and tests.  A problem that retrying
cannot fix fires a failed TransferResult; a problem that may pass (a refused
connection, a timeout, HTTP 5xx) fails the Deferred so that the pipeline's
queue delivers the job again.
"""

import dataclasses
import errno
import os
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from zope.interface import implementer

from transferd import files
from transferd.http import DestinationRefused, HTTPClient, Timeout
from transferd.interfaces import IMover, IReconfigurable
from transferd.jobs import TransferResult
from transferd.validation import DestinationRules, under_roots

OWNER_XATTR = "user.transferd.job_id"  # names the job that delivered a file:// product
RETRYABLE_STATUS = frozenset({408, 425, 429})  # 4xx codes that mean "try again later"
HINTS = {
    401: "the destination wants credentials",
    403: "the destination refused permission",
    404: "no such location",
    ("MKCOL", 409): "its parent collection does not exist",
    ("PUT", 409): "its parent collection does not exist",
    413: "the file is too large for the destination",
}


class DestinationUnavailable(Exception):
    """The destination cannot take the product now; retrying later may work."""


class TransferCancelled(Exception):
    """cancel(job) was called while the job's transfer ran."""


def _owner(path):
    """The job id recorded on a delivered product, or None."""
    try:
        return os.getxattr(path, OWNER_XATTR, follow_symlinks=False).decode("utf-8", "replace")
    except OSError:
        return None


def _set_owner(path, job_id):
    """Record job_id on path; quietly skipped where the filesystem has no user xattrs."""
    try:
        os.setxattr(path, OWNER_XATTR, job_id.encode("utf-8"), follow_symlinks=False)
    except OSError as error:
        if error.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise


@dataclasses.dataclass(frozen=True)
class _Delivered:
    """What a delivery did: files and bytes written to location (none when already there)."""

    files: int
    bytes: int
    location: str
    earlier: bool = False  # this job had delivered it before (a redo after a crash)


class _Running:
    """One transfer in progress, so that cancel(job) can stop it."""

    def __init__(self):
        self.cancelled = False
        self.request = None  # the HTTP request in flight, if any

    def check(self):
        if self.cancelled:
            raise TransferCancelled()


@implementer(IMover, IReconfigurable)
class LocalMover(Service):
    """Delivers staged products to file:// directories under file_roots, or by HTTP PUT."""

    log = Logger()
    schemes = frozenset({"file", "http", "https", "davs"})
    asynchronous = False
    timeout = None
    give_up_after = None  # it is never away: a destination it cannot write fails the transfer

    def __init__(self, file_roots, reactor, clock, request_timeout=60.0, overwrite=False, tls_policy=None,
                 min_rate=1 << 20, destinations=None, resolver=None, metrics=None):
        """file_roots: the directories file:// destinations must lie in.
        reactor, clock: do the HTTP I/O, and time it out.
        request_timeout: seconds an HTTP request may take, plus size / min_rate
        (bytes per second) for a PUT of size bytes.
        overwrite: replace an existing file:// product another job delivered.
        tls_policy: an IPolicyForHTTPS for https/davs (CA bundle, client certificate).
        destinations, resolver: the DestinationRules every address connected to must pass, and the
        IHostnameResolver that resolves names (transferd.http.CheckedEndpointFactory).
        """
        self.file_roots = tuple(file_roots)
        self.destinations = destinations
        self.http = HTTPClient(reactor, clock, timeout=request_timeout, tls_policy=tls_policy,
                               destinations=destinations, resolver=resolver, service="destination", metrics=metrics)
        self.request_timeout = request_timeout
        self.min_rate = min_rate
        self.overwrite = overwrite
        self.deliveries = 0
        self._running = {}  # job_id -> _Running

    def reconfigure(self, config):
        """New destination host rules (SIGHUP).  The HTTP client checks addresses only when rules were set at start."""
        from transferd.config import ConfigError

        rules, section = self.destinations, config.transfer
        if rules is None:
            return
        if not rules.restricts_addresses and (section.allowed_hosts or section.denied_hosts):
            raise ConfigError("[transfer] allowed_hosts / denied_hosts: the local mover checks the addresses it"
                              " connects to only when host rules were set at start; restart transferd to set the first")
        rules.reconfigure(config)

    # -- IMover -----------------------------------------------------------

    def transfer(self, job):
        return defer.Deferred.fromCoroutine(self._transfer(job))

    def cancel(self, job):
        """Stop job's transfer between chunks or files; its transfer() fires a failed result."""
        running = self._running.get(job.job_id)
        if running is not None:
            running.cancelled = True
            if running.request is not None:
                running.request.cancel()
        return defer.succeed(None)

    def pollers(self, outcomes):
        return []  # transfer() fires with the outcome

    def stopService(self):
        super().stopService()
        return self.http.stop()

    # -- transfers --------------------------------------------------------

    async def _transfer(self, job):
        destination = job.destination_path
        source = job.stager_path
        if not source:
            return TransferResult(False, f"job {job.job_id} has no staged copy to deliver")
        try:
            parts = urlsplit(destination)
        except ValueError:
            return TransferResult(False, f"destination {destination!r} is not a valid URL")
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            return TransferResult(False, f"the local mover cannot write {scheme}:// destinations ({destination})")
        running = self._running[job.job_id] = _Running()
        try:
            if scheme == "file":
                outcome = await threads.deferToThread(self._to_directory, job, parts, running)
            else:
                outcome = await self._to_http(job, parts, running)
        except DestinationRefused as refused:
            outcome = TransferResult(False, str(refused))
        except Exception:
            if not running.cancelled:
                raise
            outcome = TransferResult(False, f"transfer to {destination} was cancelled")
        finally:
            if self._running.get(job.job_id) is running:
                del self._running[job.job_id]
        if isinstance(outcome, TransferResult):
            return outcome
        if outcome.earlier:
            self.log.info("job {job_id}: {location} was already delivered by this job",
                          job_id=job.job_id, location=outcome.location)
            return TransferResult(True, f"already delivered to {outcome.location}")
        self.deliveries += 1
        self.log.info("job {job_id}: delivered {files} file(s), {bytes} bytes to {destination}",
                      job_id=job.job_id, files=outcome.files, bytes=outcome.bytes, destination=destination,
                      location=outcome.location)
        return TransferResult(True, f"delivered {outcome.files} file(s), {outcome.bytes} bytes to {outcome.location}")

    def _to_directory(self, job, parts, running):
        """Copy the product into the file:// directory (runs in a thread).

        Returns a failed TransferResult, or what was _Delivered.
        """
        url = job.destination_path
        directory = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            return TransferResult(False, f"destination {url} is not a local directory URL (file:///dir)")
        if not directory.startswith("/") or ".." in directory.split("/"):
            return TransferResult(False, f"destination {url} must be an absolute path without '..'")
        if not under_roots(directory, self.file_roots):
            return TransferResult(
                False, f"destination {url} is outside the directories this mover may write "
                       f"({', '.join(self.file_roots)})")
        source = job.stager_path
        if not os.path.exists(source):
            return TransferResult(False, f"the staged copy {source} is missing")
        os.makedirs(directory, exist_ok=True)
        directory = os.path.realpath(directory)
        if not under_roots(directory, self.file_roots):  # a link appeared while we looked
            return TransferResult(False, f"destination {url} is outside the allowed directories")
        name = os.path.basename(source.rstrip("/"))
        final = os.path.join(directory, name)
        if os.path.lexists(final):
            if _owner(final) == job.job_id:
                return _Delivered(0, 0, final, earlier=True)
            if not self.overwrite:
                return TransferResult(False, f"destination {final} already exists")
        partial = os.path.join(directory, f".{name}.transferd-{job.job_id}")
        files.remove(partial)  # a copy a crash interrupted
        try:
            copied = files.copy_tree(source, partial, name, check=running.check)
            _set_owner(partial, job.job_id)
            if os.path.lexists(final) and (os.path.isdir(final) or os.path.isdir(partial)):
                files.remove(final)  # overwrite: rename replaces a file by a file only
            os.rename(partial, final)
        except BaseException:
            files.remove(partial)
            raise
        return _Delivered(len(copied), sum(f.size for f in copied), final)

    async def _to_http(self, job, parts, running):
        """PUT each file under the destination URL; MKCOL the collections first for davs."""
        source = job.stager_path
        name = os.path.basename(source.rstrip("/"))
        parent = os.path.dirname(source.rstrip("/"))
        recorded = [(f.path, f.size) for f in job.files()]
        if any(not files.safe_relative(path, name) for path, _ in recorded):
            return TransferResult(False, f"the staged file list of job {job.job_id} names files outside "
                                         f"the product {name!r}")
        if not await threads.deferToThread(os.path.exists, source):
            return TransferResult(False, f"the staged copy {source} is missing")
        listed = recorded or await threads.deferToThread(files.list_tree, source)
        scheme = "https" if parts.scheme.lower() == "davs" else parts.scheme.lower()
        base = parts.path.rstrip("/")

        def url(relative):
            path = base + "/" + quote(relative, safe="/") if relative else base or "/"
            return urlunsplit((scheme, parts.netloc, path, parts.query, ""))

        if parts.scheme.lower() == "davs":
            collections = {""}
            for path, _ in listed:
                pieces = path.split("/")[:-1]
                collections.update("/".join(pieces[:n]) for n in range(1, len(pieces) + 1))
            for collection in sorted(collections, key=lambda c: (c.count("/") if c else -1, c)):
                running.check()
                target = url(collection) + ("/" if collection else "")
                code, phrase = await self._request(running, "MKCOL", target)
                if not (200 <= code < 300 or code == 405):  # 405: it exists already
                    return self._refused("MKCOL", target, code, phrase)
        total = 0
        for path, _ in listed:
            running.check()
            target = url(path)
            try:
                body = open(os.path.join(parent, path), "rb")
            except FileNotFoundError:
                return TransferResult(False, f"the staged file {os.path.join(parent, path)} is missing")
            with body:
                producer = FileBodyProducer(body)
                code, phrase = await self._request(running, "PUT", target, data=producer,
                                                   size=producer.length)
                total += producer.length
            if not 200 <= code < 300:
                return self._refused("PUT", target, code, phrase)
        return _Delivered(len(listed), total, url(name))

    async def _request(self, running, method, url, data=None, size=0):
        """One whole request, answer read, within request_timeout + size / min_rate; (code, phrase)."""
        limit = self.request_timeout + (size / self.min_rate if self.min_rate else 0)
        running.request = self.http.request(method, url, data=data, timeout=limit)
        try:
            answer = await running.request
        except Timeout as error:
            raise DestinationUnavailable(f"{method} {url} got {error}") from None
        finally:
            running.request = None
        if answer.code >= 500 or answer.code in RETRYABLE_STATUS:
            raise DestinationUnavailable(f"{method} {url} answered HTTP {answer.code} {answer.phrase}")
        return answer.code, answer.phrase

    @staticmethod
    def _refused(method, url, code, phrase):
        if 300 <= code < 400:
            reason = f"redirected (HTTP {code} {phrase}), which the local mover does not follow"
        else:
            reason = f"answered HTTP {code} {phrase}"
            hint = HINTS.get((method, code)) or HINTS.get(code)
            if hint:
                reason += f" ({hint})"
        return TransferResult(False, f"{method} {url} {reason}")


def from_config(config, reactor, clock, store, metrics=None):
    """The local mover from [transfer]; its HTTP connections are checked against the destination host rules."""
    section = config.transfer
    rules = DestinationRules(section.allowed_schemes, section.file_roots, section.allowed_hosts, section.denied_hosts)
    return LocalMover(section.file_roots, reactor, clock, destinations=rules, metrics=metrics)
