"""Checks on what users send, with messages a person can act on.

Each check raises BadRequest whose message goes back to the client as is.
"""

import ipaddress
import os
import re
from urllib.parse import unquote, urlsplit

from zope.interface import implementer

from transferd.interfaces import IReconfigurable

MAX_PRODUCT_ID = 200
MAX_DESTINATION = 2048
PRODUCT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@,-]*\Z")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadRequest(ValueError):
    """The request is wrong; the message says how, for a human."""


def product_id(value):
    """A product id is one plain name: no separators, no '..', bounded length."""
    if not isinstance(value, str) or not value:
        raise BadRequest("product_id is required")
    if len(value) > MAX_PRODUCT_ID:
        raise BadRequest(f"product_id is longer than {MAX_PRODUCT_ID} characters")
    if ".." in value or not PRODUCT_ID.match(value):
        raise BadRequest(
            "product_id must be a plain name: letters, digits and . _ + = @ , - "
            "(starting with a letter or digit, no '/' and no '..')"
        )
    return value


@implementer(IReconfigurable)
class DestinationRules:
    """Where users may send products: [transfer] allowed_schemes, file_roots, allowed_hosts, denied_hosts.

    Host patterns: a name ("dav.example.org", compared without case), a
    wildcard for subdomains ("*.example.org", not the bare domain), or a
    network ("192.0.2.0/24", "2001:db8::/32") matching IP addresses.
    check() runs on what users send and never resolves a name; when
    transferd itself connects to a destination (transferd.http), every
    address the name resolves to goes through check_address() first, and
    only a checked address is connected to.
    """

    def __init__(self, schemes, file_roots, allowed_hosts=(), denied_hosts=()):
        self.schemes = tuple(schemes)
        self.file_roots = tuple(file_roots)
        self.allowed_hosts = tuple(host_pattern(pattern) for pattern in allowed_hosts)
        self.denied_hosts = tuple(host_pattern(pattern) for pattern in denied_hosts)

    def reconfigure(self, config):
        """New [transfer] allowed_hosts and denied_hosts, both at once (SIGHUP; transferd.interfaces.IReconfigurable)."""
        section = config.transfer
        allowed = tuple(host_pattern(pattern) for pattern in section.allowed_hosts)
        denied = tuple(host_pattern(pattern) for pattern in section.denied_hosts)
        self.allowed_hosts, self.denied_hosts = allowed, denied

    def check(self, value):
        """The destination URL, unchanged, or BadRequest saying what is wrong."""
        url = destination(value, self.schemes, self.file_roots)
        host = urlsplit(url).hostname
        if host is not None:  # not file:///...
            self.check_host(host)
        return url

    def check_host(self, host, subject="destination host", refused="one this service delivers to"):
        """host as the rules compare it (lower case, a numeric name checked), or BadRequest naming subject."""
        host = _literal_host(host, subject)
        if any(matches(host) for matches in self.denied_hosts):
            raise BadRequest(f"{subject} {host} is not allowed here")
        if self.allowed_hosts and not any(matches(host) for matches in self.allowed_hosts):
            raise BadRequest(f"{subject} {host} is not {refused}")
        return host

    @property
    def restricts_addresses(self):
        return bool(self.allowed_hosts or self.denied_hosts)

    def check_address(self, host, address):
        """BadRequest unless transferd may connect to address (text) for the URL host host.

        Denied: the host or the address matches denied_hosts.  With
        allowed_hosts, the host or the address must match one of them.
        """
        host = host.lower().rstrip(".")
        for name in (host, address):
            if any(matches(name) for matches in self.denied_hosts):
                raise BadRequest(f"destination host {host} resolves to {address}, which is not allowed here")
        if self.allowed_hosts and not any(matches(name) for matches in self.allowed_hosts for name in (host, address)):
            raise BadRequest(f"destination host {host} resolves to {address}, which is not one this service"
                             " delivers to")


NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?\Z", re.IGNORECASE)


def _literal_host(host, subject="destination host"):
    """host in lower case without a trailing dot; numeric names must be plain dotted IPv4 addresses.

    "2130706433", "0x7f.1" or "127.1" reach 127.0.0.1 with many clients;
    they would slip past a network pattern, so they are not accepted at all.
    """
    host = host.lower().rstrip(".")
    if NUMERIC_HOST.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise BadRequest(f"{subject} {host} is not a valid host name or IP address") from None
    return host


def host_pattern(pattern):
    """A predicate host -> bool for one configured pattern (ValueError when the pattern is malformed)."""
    pattern = pattern.strip().lower().rstrip(".")
    if "/" in pattern:
        network = ipaddress.ip_network(pattern, strict=False)

        return lambda host: _address(host) is not None and _address(host) in network
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return lambda host: host.endswith(suffix)
    if not pattern or "*" in pattern:
        raise ValueError(f"host pattern {pattern!r} must be a name, *.domain or an address/prefix")
    try:
        address = ipaddress.ip_address(pattern)
    except ValueError:
        return lambda host: host == pattern
    return lambda host: _address(host) == address


def _address(host):
    """host as an IP address (IPv4-mapped IPv6 as IPv4), or None when it is a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def destination(value, allowed_schemes, file_roots):
    """A destination is a URL with an allowed scheme and a path; file:// must lie under a root.

    Returns the URL unchanged.
    """
    if not isinstance(value, str) or not value:
        raise BadRequest("destination_path is required")
    if len(value) > MAX_DESTINATION:
        raise BadRequest(f"destination_path is longer than {MAX_DESTINATION} characters")
    if CONTROL.search(value) or CONTROL.search(unquote(value)):
        raise BadRequest("destination_path contains control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise BadRequest(f"destination_path {value!r} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise BadRequest(
            f"destination_path must be a URL such as file:///dir or davs://host/dir "
            f"(allowed schemes: {', '.join(allowed_schemes)})"
        )
    if scheme not in allowed_schemes:
        raise BadRequest(
            f"destination scheme {scheme}:// is not allowed here (allowed: {', '.join(allowed_schemes)})"
        )
    if parts.fragment or value.endswith("#"):
        raise BadRequest("destination_path must not contain a fragment (#...)")
    path = unquote(parts.path)
    if not path or not path.startswith("/"):
        raise BadRequest("destination_path must include an absolute path, e.g. davs://host/dir")
    if ".." in path.split("/"):
        raise BadRequest("destination_path must not contain '..'")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BadRequest("file:// destinations must be local (file:///dir)")
        if parts.query:
            raise BadRequest("file:// destinations take no query string")
        if not under_roots(path, file_roots):
            raise BadRequest(
                f"file:// destinations must lie under {', '.join(file_roots)}"
            )
    elif not parts.hostname:
        raise BadRequest(f"destination_path {value!r} has no host")
    return value


def under_roots(path, roots):
    """True when path, with symbolic links resolved, is one of roots or inside one."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False
