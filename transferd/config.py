"""Configuration: an INI file read with configparser, checked key by key, then as a whole.

Every key has a parser and a default; the defaults are the embedded set-up
(SQLite, in-process queue, local stager and mover).  The parsers turn text
into the values the daemon uses (the database and queue URLs and the API
endpoint become dataclasses), so no other module parses configuration text.
Then check_rules() applies the rules between keys and check_paths() looks at
the files and directories the configuration names.  Every refusal is a
ConfigError naming section and key, which start-up shows as one line.
conf/transferd.ini documents every key; tests/test_config.py checks that the
two agree.
"""

import configparser
import dataclasses
import datetime
import ipaddress
import math
import os
import posixpath
import re
from typing import Optional
from urllib.parse import parse_qsl, unquote, urlsplit


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


def _redacted(text):
    """text with any URL password replaced by ***: messages and logs never show one."""
    return re.sub(r"(://[^:/@\s]*:).*@", r"\1***@", text)


# -- simple values ----------------------------------------------------------------


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError("must be a number of seconds, zero or more")
    return value


def _positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a number of seconds greater than zero")
    return value


def _text(text):
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _url(*schemes):
    def parse(text):
        text = text.strip()
        if urlsplit(text).scheme not in schemes:
            raise ValueError(_scheme_message(schemes))
        return text

    return parse


def _scheme_message(schemes):
    return f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}"


def _word_list(text):
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("must list at least one value")
    return tuple(items)


def _path_list(text):
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if not item.startswith("/"):
            raise ValueError(f"{item!r} is not an absolute path")
    return tuple(items)


def _optional_text(text):
    """Text, or None when left empty (an optional setting)."""
    return text.strip() or None


def _optional_url(*schemes):
    check = _url(*schemes)
    return lambda text: check(text) if text.strip() else None


def _boolean(text):
    value = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise ValueError("must be true or false")
    return value


def _days_or_forever(text):
    """Whole days as a timedelta; 0 or empty: None (forever)."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError("must be a whole number of days (0 or empty: keep forever)")
    return datetime.timedelta(days=int(text)) if int(text) else None


def _whole_number(text):
    value = int(text)
    if value < 0:
        raise ValueError("must be a whole number, zero or more")
    return value


def _lines(text):
    """One item per line (indented continuation lines in the INI file); empty lines dropped."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _case_list(text):
    """A comma-separated list, case kept (audiences, host names are compared as given)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _audiences(text):
    """Token audiences: comma-separated; a space inside one means the operator separated them by spaces."""
    audiences = _case_list(text)
    for audience in audiences:
        if any(char.isspace() for char in audience):
            raise ValueError(f"{audience!r} contains a space: separate audiences with commas")
    return audiences


def _host_list(text):
    """Destination host patterns (see transferd.validation.DestinationRules), checked at start-up."""
    from transferd.validation import host_pattern

    patterns = _case_list(text)
    for pattern in patterns:
        host_pattern(pattern)
    return patterns


def _issuer_lines(text):
    """Lines "ISSUER JWKS [kid-optional]": a trusted token issuer, where its keys are (https:// URL or a file),
    and whether its tokens may omit the key id (kid) the WLCG profile requires."""
    from transferd.auth.tokens import TrustedIssuer

    issuers = {}
    for line in _lines(text):
        parts = line.split()
        if len(parts) not in (2, 3) or parts[2:] not in ([], ["kid-optional"]):
            raise ValueError(f"each line must be 'ISSUER JWKS' or 'ISSUER JWKS kid-optional' (issuer, space, JWKS URL"
                             f" or file), not {line!r}")
        issuer, jwks = parts[:2]
        if issuer in issuers:
            raise ValueError(f"issuer {issuer} is listed twice")
        issuers[issuer] = TrustedIssuer(jwks, kid_optional=len(parts) == 3)
    return issuers


TOKEN_IDENTITY = re.compile(r"SUB=\S.*, ISS=\S+\Z")  # transferd.auth.access.token_identity


def _dn_lines(text):
    """Certificate DNs, one per line, in the grid's slash form (as transferd.auth.x509 reports them)."""
    dns = _lines(text)
    for dn in dns:
        if not dn.startswith("/") or "=" not in dn:
            raise ValueError(f"{dn!r} is not a DN in the slash form /DC=org/DC=example/CN=Name")
    return dns


FQAN = re.compile(r"/[\w.-]+(/[\w.-]+)*(/Role=[\w.-]+)?(/Capability=[\w.-]+)?\Z")  # transferd.auth.voms


def _identity_lines(text):
    """Identities, one per line: a slash-form DN, "SUB=<sub>, ISS=<iss>", or a VOMS FQAN (/vo/group/Role=r)."""
    identities = _lines(text)
    for identity in identities:
        dn = identity.startswith("/") and "=" in identity.split("/")[1]
        if not dn and not TOKEN_IDENTITY.match(identity) and not FQAN.match(identity):
            raise ValueError(f"{identity!r} is neither a DN (/DC=org/.../CN=Name), 'SUB=<sub>, ISS=<iss>'"
                             " nor an FQAN (/vo/group/Role=role)")
    return identities


def _limit(text):
    """A whole number of at least 1, or "unlimited" (None)."""
    text = text.strip()
    if text.lower() == "unlimited":
        return None
    try:
        return _positive_int(text)
    except ValueError:
        raise ValueError("must be a whole number of at least 1, or unlimited") from None


GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


def _group_lines(text):
    """Fair-share groups, one member per line: "<group> <identity or FQAN>" (as [auth] admins names them)."""
    groups = []
    for line in _lines(text):
        name, _, member = line.partition(" ")
        member = member.strip()
        if not GROUP_NAME.match(name) or not member:
            raise ValueError(f"{line!r} is not \"<group> <member>\": a group name (letters, digits, _ . -) then"
                             " a DN, SUB=<sub>, ISS=<iss>, or an FQAN")
        groups.append((name, _identity_lines(member)[0]))
    return tuple(groups)


def _weight_lines(text):
    """Fair-share weights, one per line: "<weight> <share>", a share being a group or a submitter's identity."""
    weights = {}
    for line in _lines(text):
        number, _, share = line.partition(" ")
        share = share.strip()
        try:
            weight = float(number)
        except ValueError:
            weight = 0.0
        if not weight > 0 or weight == float("inf") or not share:
            raise ValueError(f"{line!r} is not \"<weight> <share>\": a number above 0, then a group name or a"
                             " submitter's identity")
        if share in weights:
            raise ValueError(f"{share!r} has two weights")
        weights[share] = weight
    return tuple((weight, share) for share, weight in weights.items())


def _host_limit_lines(text):
    """Per destination host limits, one per line: "<host> <limit>"."""
    limits = []
    for line in _lines(text):
        host, _, number = line.partition(" ")
        try:
            limit = _positive_int(number.strip())
        except ValueError:
            raise ValueError(f"{line!r} is not \"<host> <limit>\": a host name then a whole number of at least"
                             " 1") from None
        limits.append((host.lower(), limit))
    return tuple(limits)


def _word(text):
    """One word or nothing (a VO name): None when empty."""
    text = text.strip()
    if any(char.isspace() for char in text):
        raise ValueError("must be one word (a VO name such as meerkat)")
    return text or None


@dataclasses.dataclass(frozen=True)
class Subscriber:
    """One line of [events] subscribers: who gets webhooks for which states, signed with the secrets in a file."""

    name: str
    url: str
    secret_file: str
    states: tuple


SUBSCRIBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
TERMINAL_STATES = ("SUCCESS", "ERROR", "CANCELLED")


def _states(text):
    """Job states, comma-separated (any case), as the state machine names them."""
    from transferd import jobs

    states = tuple(dict.fromkeys(item.strip().upper() for item in text.split(",") if item.strip()))
    if not states:
        raise ValueError("must list at least one job state")
    unknown = [state for state in states if state not in jobs.STATES]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} is not a job state (states: {', '.join(jobs.STATES)})")
    return states


def _subscriber_lines(text):
    """Lines "NAME URL SECRET_FILE [STATES]": a webhook subscriber, its http(s) URL, the file of its
    whsec_ secret(s), and the states it wants (comma-separated, no spaces; default the terminal ones)."""
    subscribers = {}
    for line in _lines(text):
        parts = line.split()
        if len(parts) not in (3, 4):
            raise ValueError(f"each line must be 'NAME URL SECRET_FILE' or 'NAME URL SECRET_FILE STATES', not {line!r}")
        name, url, secret_file = parts[:3]
        if not SUBSCRIBER_NAME.match(name):
            raise ValueError(f"subscriber name {name!r} must be letters, digits, '_', '.' or '-' (at most 63)")
        if name in subscribers:
            raise ValueError(f"subscriber {name} is listed twice")
        try:
            parsed = urlsplit(url)
            parsed.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"subscriber {name}: {url!r} is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"subscriber {name}: {url!r} must be an http:// or https:// URL with a host")
        if not os.path.isabs(secret_file):
            raise ValueError(f"subscriber {name}: the secret file {secret_file!r} must be an absolute path")
        try:
            states = _states(parts[3]) if len(parts) == 4 else TERMINAL_STATES
        except ValueError as error:
            raise ValueError(f"subscriber {name}: {error}") from None
        subscribers[name] = Subscriber(name, url, secret_file, states)
    return tuple(subscribers.values())


def _choice(*choices):
    def parse(text):
        text = text.strip()
        if text not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return text

    return parse


# -- [database] url -----------------------------------------------------------------

# mysql:// query options: name -> type.  pool_* size the adbapi pool, the others go to MySQLdb.connect.
MYSQL_OPTIONS = {
    "pool_min": int,
    "pool_max": int,
    "connect_timeout": int,
    "read_timeout": int,
    "write_timeout": int,
    "unix_socket": str,
}


@dataclasses.dataclass(frozen=True)
class DatabaseURL:
    """[database] url, parsed: a SQLite file (path), or a MySQL/MariaDB server and pool."""

    text: str = dataclasses.field(repr=False)  # as written; may hold a password, so str() hides it
    scheme: str  # "sqlite" or "mysql"
    path: Optional[str] = None  # sqlite: relative to the working directory, or absolute
    host: Optional[str] = None
    port: Optional[int] = None
    user: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    database: Optional[str] = None
    connect_timeout: Optional[int] = None
    read_timeout: Optional[int] = None
    write_timeout: Optional[int] = None
    unix_socket: Optional[str] = None
    pool_min: Optional[int] = None
    pool_max: Optional[int] = None

    def __str__(self):
        return _redacted(self.text)

    def connect_keywords(self):
        """The MySQLdb.connect keyword arguments this URL asks for."""
        keywords = dict(host=self.host, port=self.port, user=self.user, password=self.password,
                        database=self.database, connect_timeout=self.connect_timeout)
        for name in ("read_timeout", "write_timeout", "unix_socket"):
            if getattr(self, name) is not None:
                keywords[name] = getattr(self, name)
        return keywords


def parse_database_url(text):
    """sqlite:///relative/path, sqlite:////absolute/path or mysql://user:password@host:port/db?options."""
    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme == "sqlite":
        return _sqlite_url(text, parts)
    if parts.scheme == "mysql":
        return _mysql_url(text, parts)
    raise ValueError(_scheme_message(("sqlite", "mysql")))


def _sqlite_url(text, parts):
    if parts.netloc:
        raise ValueError("a sqlite url names no host: sqlite:///relative/path or sqlite:////absolute/path")
    if parts.query or parts.fragment:
        raise ValueError("a sqlite url takes no options")
    if not parts.path.lstrip("/"):
        raise ValueError("sqlite url needs a path, e.g. sqlite:///var/transferd.sqlite")
    if not text.startswith("sqlite:///"):
        raise ValueError("write sqlite:///relative/path or sqlite:////absolute/path")
    path = "/" + parts.path.lstrip("/") if parts.path.startswith("//") else parts.path[1:]
    return DatabaseURL(text, "sqlite", path=path)


def _mysql_url(text, parts):
    """user and password are percent-decoded; the port defaults to 3306."""
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError("mysql url needs a database name: mysql://user:password@host:3306/transferd")
    if not parts.username:
        raise ValueError("mysql url needs a user: mysql://user:password@host:3306/transferd")
    try:
        port = parts.port or 3306
    except ValueError as error:
        raise ValueError(f"mysql url has a bad port: {error}") from None
    options = dict(connect_timeout=10, pool_min=2, pool_max=10)
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        if name not in MYSQL_OPTIONS:
            raise ValueError(f"unknown mysql url option {name!r} (known: {', '.join(sorted(MYSQL_OPTIONS))})")
        kind = MYSQL_OPTIONS[name]
        try:
            options[name] = kind(value)
        except ValueError:
            raise ValueError(f"mysql url option {name} must be an integer, not {value!r}") from None
        if kind is int and options[name] < 1:
            raise ValueError(f"mysql url option {name} must be at least 1")
    if options["pool_min"] > options["pool_max"]:
        raise ValueError("mysql url option pool_min must not exceed pool_max")
    return DatabaseURL(
        text, "mysql", host=parts.hostname or "localhost", port=port, user=unquote(parts.username),
        password=unquote(parts.password or ""), database=database, **options,
    )


# -- [queue] url ----------------------------------------------------------------------

# amqp:// query options and their defaults.
AMQP_OPTIONS = {
    "prefix": "transferd",
    "heartbeat": "30",
    "blocked_connection_timeout": "60",
    "retry_delay": "1",
    "connection_name": "",
}


@dataclasses.dataclass(frozen=True)
class QueueURL:
    """[queue] url, parsed: the in-process queue, or a RabbitMQ broker and how to talk to it."""

    text: str = dataclasses.field(repr=False)  # as written; may hold a password, so str() hides it
    scheme: str  # "memory", "amqp" or "amqps"
    host: Optional[str] = None
    port: Optional[int] = None
    vhost: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    tls: bool = False
    prefix: Optional[str] = None  # queue names are <prefix>.<name>
    heartbeat: Optional[int] = None
    blocked_connection_timeout: Optional[float] = None
    retry_delay: Optional[float] = None  # seconds a failed delivery waits before it is delivered again
    connection_name: Optional[str] = None  # None: the queue names its connection after host and pid

    def __str__(self):
        return _redacted(self.text)


def parse_queue_url(text):
    """memory://, or amqp[s]://user:password@host:port/vhost?prefix=transferd&heartbeat=30&..."""
    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme == "memory":
        if parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("memory:// takes no host, path or options")
        return QueueURL(text, "memory")
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(_scheme_message(("memory", "amqp", "amqps")))
    options = dict(AMQP_OPTIONS)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in options:
            raise ValueError(f"unknown option {key!r} in the queue url (known: {', '.join(sorted(AMQP_OPTIONS))})")
        options[key] = value
    if not options["prefix"]:
        raise ValueError("the queue url's prefix may not be empty")
    tls = parts.scheme == "amqps"
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError as error:
        raise ValueError(f"the queue url has a bad port: {error}") from None
    try:
        heartbeat = int(options["heartbeat"])
        blocked = float(options["blocked_connection_timeout"])
        retry_delay = float(options["retry_delay"])
    except ValueError as error:
        raise ValueError(f"bad number in the queue url: {error}") from None
    for name, value in (("heartbeat", heartbeat), ("blocked_connection_timeout", blocked),
                        ("retry_delay", retry_delay)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"the queue url's {name} must be a number, zero or more")
    return QueueURL(
        text, parts.scheme,
        host=parts.hostname or "localhost",
        port=port,
        vhost=unquote(parts.path[1:]) if parts.path not in ("", "/") else "/",
        user=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        tls=tls,
        prefix=options["prefix"],
        heartbeat=heartbeat,
        blocked_connection_timeout=blocked,
        retry_delay=retry_delay,
        connection_name=options["connection_name"] or None,
    )


# -- [api] endpoint -------------------------------------------------------------------

# Positional parameters of the endpoint types transferd looks into, in Twisted's order, and defaults.
ENDPOINT_PARAMETERS = {
    "tcp": (("port", "interface", "backlog"), {"interface": ""}),
    "tcp6": (("port", "backlog", "interface"), {"interface": "::"}),
    "unix": (("address", "mode", "backlog", "lockfile"), {}),
}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """[api] endpoint, parsed: the Twisted server endpoint string and where it listens."""

    text: str  # what serverFromString is given
    kind: str  # "tcp", "tcp6", "unix", or "other" (any other endpoint type)
    port: Optional[int] = None  # tcp, tcp6
    interface: Optional[str] = None  # tcp, tcp6: "" (tcp) or "::" (tcp6) is every interface

    def __str__(self):
        return self.text

    @property
    def local_only(self):
        """True when surely only this machine can connect: a unix socket, or a loopback address."""
        if self.kind == "unix":
            return True
        if self.kind in ("tcp", "tcp6"):
            try:
                return ipaddress.ip_address(self.interface).is_loopback
            except ValueError:
                return False  # "" (every interface) or a host name
        return False


def _endpoint_fields(text):
    """Twisted's endpoint syntax: ':'-separated fields, each 'name=value' or positional; '\\' escapes."""
    args, kwargs = [], {}
    name, field = None, ""

    def end_field():
        if name is None:
            args.append(field)
        else:
            kwargs[name] = field

    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("ends with a lone backslash")
            field += escaped
        elif char == ":":
            end_field()
            name, field = None, ""
        elif char == "=" and name is None:
            name, field = field, ""
        else:
            field += char
    end_field()
    return args, kwargs


def parse_endpoint(text):
    """A Twisted server endpoint string such as tcp:8080:interface=127.0.0.1, checked by Twisted itself."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    text = text.strip()
    args, kwargs = _endpoint_fields(text)
    try:
        serverFromString(MemoryReactor(), text)  # a reactor that never listens: only the spec is checked
    except Exception as error:  # endpoint parsers, plugins included, raise whatever they like
        raise ValueError(f"not a usable Twisted server endpoint: {str(error) or type(error).__name__}") from None
    kind = args[0].lower()  # Twisted matches plugin prefixes (tcp6) without case
    if kind not in ENDPOINT_PARAMETERS:
        return Endpoint(text, "other")
    names, defaults = ENDPOINT_PARAMETERS[kind]
    values = dict(defaults)
    values.update(zip(names, args[1:]))
    values.update(kwargs)
    if kind == "unix":
        return Endpoint(text, kind)
    port = int(values["port"])
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not between 0 and 65535")
    return Endpoint(text, kind, port=port, interface=values["interface"])


def _optional_endpoint(text):
    """A Twisted server endpoint (parse_endpoint), or None when left empty."""
    return parse_endpoint(text) if text.strip() else None


# [log] level: the least severe events logged (twisted.logger's level names).
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


# -- the keys -----------------------------------------------------------------------

# section -> key -> (parser, default text)
SCHEMA = {
    "api": {
        "endpoint": (parse_endpoint, "tcp:8080:interface=127.0.0.1"),
        "public_url": (_url("http", "https"), "http://127.0.0.1:8080"),
        "max_body_bytes": (_positive_int, "65536"),
        "max_header_bytes": (_positive_int, "16384"),
        "idle_timeout": (_positive_float, "60"),
        "connection_timeout": (_positive_float, "600"),
        "max_connections_per_peer": (_positive_int, "100"),
        "tls_cert": (_optional_text, ""),
        "tls_key": (_optional_text, ""),
        "access_log": (_boolean, "true"),
        "max_batch": (_positive_int, "10000"),
        "max_batch_bytes": (_positive_int, "16777216"),
    },
    "auth": {
        "x509_ca_path": (_optional_text, ""),
        "voms_dir": (_optional_text, ""),
        "token_issuers": (_issuer_lines, ""),
        "token_audiences": (_audiences, ""),
        "jwks_refresh": (_positive_float, "3600"),
        "admins": (_identity_lines, ""),
        "stager_dns": (_dn_lines, ""),
        "audit_log": (_optional_text, ""),
    },
    "database": {
        "url": (parse_database_url, "sqlite:///transferd-data/transferd.sqlite"),
    },
    "queue": {
        "url": (parse_queue_url, "memory://"),
        "prefetch": (_positive_int, "8"),
        "max_deliveries": (_positive_int, "5"),
    },
    "stager": {
        "backend": (_choice("local", "callback", "taperest"), "local"),
        "archive_root": (_text, "transferd-data/archive"),
        "staging_root": (_text, "transferd-data/staging"),
        "delay": (_non_negative_float, "0"),
        "timeout": (_positive_float, "3600"),
        "max_attempts": (_positive_int, "3"),
        "give_up_after": (_positive_float, "86400"),
        "url": (_optional_url("http", "https"), ""),
        "retry_delay": (_positive_float, "2"),
        "bulk_size": (_positive_int, "100"),
        "poll_interval": (_positive_float, "30"),
        "max_poll_interval": (_positive_float, "300"),
        "namespace_mount": (_optional_text, ""),
        "token_file": (_optional_text, ""),
        "cert": (_optional_text, ""),
        "key": (_optional_text, ""),
        "ca_path": (_optional_text, ""),
    },
    "transfer": {
        "backend": (_choice("local", "fts"), "local"),
        "allowed_schemes": (_word_list, "file, http, https, davs"),
        "file_roots": (_path_list, "/tmp/deliveries"),
        "allowed_hosts": (_host_list, ""),
        "denied_hosts": (_host_list, ""),
    },
    "fts": {
        "endpoint": (_optional_url("https", "http"), ""),
        "auth": (_choice("x509", "token"), "x509"),
        "cert": (_optional_text, ""),
        "key": (_optional_text, ""),
        "proxy": (_optional_text, ""),
        "token_file": (_optional_text, ""),
        "ca_path": (_optional_text, ""),
        "vo": (_word, ""),
        "source_template": (_text, "gsiftp://{staged_to}{path}"),
        "poll_interval": (_positive_float, "30"),
        "max_poll_interval": (_positive_float, "300"),
        "bulk_size": (_positive_int, "100"),
        "transfer_timeout": (_positive_float, "86400"),
        "give_up_after": (_positive_float, "86400"),
        "verify_checksum": (_choice("both", "source", "target", "none"), "both"),
        "overwrite": (_boolean, "false"),
        "retry": (_whole_number, "0"),
        "priority": (_choice("1", "2", "3", "4", "5"), "3"),
        "delegation_min_lifetime": (_positive_float, "21600"),
    },
    "reconciler": {
        "interval": (_positive_float, "30"),
        "lease": (_positive_float, "30"),
        "requeue_after": (_positive_float, "300"),
    },
    "startup": {
        "wait_for_backends": (_non_negative_float, "300"),
    },
    "events": {
        "subscribers": (_subscriber_lines, ""),
        "notify_secret_file": (_optional_text, ""),
        "notify_states": (_states, "SUCCESS, ERROR, CANCELLED"),
        "timeout": (_positive_float, "15"),
        "retry_delay": (_positive_float, "5"),
        "max_retry_delay": (_positive_float, "3600"),
        "max_attempts": (_positive_int, "15"),
        "sweep_interval": (_positive_float, "10"),
        "amqp": (_boolean, "true"),
        "exchange": (_optional_text, ""),
    },
    "retention": {
        "keep": (_days_or_forever, "180"),
        "archive": (_optional_text, ""),
        "interval": (_positive_float, "3600"),
    },
    "metrics": {
        "endpoint": (_optional_endpoint, ""),
        "job_counts_max_age": (_positive_float, "5"),
    },
    "log": {
        "format": (_choice("text", "json"), "text"),
        "level": (_choice(*LOG_LEVELS), "info"),
    },
    "fleet": {
        "heartbeat": (_positive_float, "5"),
        "stale_after": (_positive_float, "30"),
    },
    "scheduler": {
        "interval": (_positive_float, "1"),
        "queued_ahead": (_positive_int, "64"),
        "groups": (_group_lines, ""),
        "weights": (_weight_lines, ""),
        "default_weight": (_positive_float, "1"),
    },
    "limits": {
        "max_staging": (_limit, "unlimited"),
        "max_transfers_per_host": (_limit, "unlimited"),
        "host_limits": (_host_limit_lines, ""),
        "max_transfers_per_submitter": (_limit, "unlimited"),
        "max_waiting_per_submitter": (_limit, "unlimited"),
        "retry_after": (_positive_float, "60"),
    },
}

# The keys a running daemon applies when it receives SIGHUP (transferd.wiring.Daemon.reload; the reference
# stager has its own, transferd.stagerd.RELOADABLE).  A change to any other key is logged as needing a restart.
RELOADABLE = frozenset({
    ("auth", "admins"), ("auth", "stager_dns"), ("auth", "token_issuers"), ("auth", "token_audiences"),
    ("auth", "x509_ca_path"),
    ("transfer", "allowed_hosts"), ("transfer", "denied_hosts"),
    ("api", "max_body_bytes"), ("api", "max_batch"), ("api", "max_batch_bytes"),
    ("log", "level"),
    ("fts", "cert"), ("fts", "key"), ("fts", "proxy"), ("fts", "token_file"),
    ("stager", "token_file"), ("stager", "cert"), ("stager", "key"),
    ("events", "subscribers"), ("events", "notify_secret_file"), ("events", "notify_states"), ("events", "timeout"),
    ("events", "retry_delay"), ("events", "max_retry_delay"), ("events", "max_attempts"),
    ("scheduler", "groups"), ("scheduler", "weights"), ("scheduler", "default_weight"),
    ("scheduler", "queued_ahead"),
    *((("limits", key) for key in ("max_staging", "max_transfers_per_host", "host_limits",
                                   "max_transfers_per_submitter", "max_waiting_per_submitter", "retry_after"))),
})


def needing_restart(running, new, reloadable=RELOADABLE):
    """The (section, key) pairs whose value differs between two Configs and that only a restart applies."""
    return [(section, key) for section, keys in SCHEMA.items() for key in keys
            if (section, key) not in reloadable
            and getattr(running.sections[section], key) != getattr(new.sections[section], key)]

# The destination schemes each [transfer] backend can write (the movers' `schemes`; a test keeps them equal).
MOVER_SCHEMES = {
    "local": frozenset({"file", "http", "https", "davs"}),
    "fts": frozenset({"gsiftp", "davs", "https", "http", "root", "srm", "s3"}),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """The parsed configuration: config.section.key."""

    sections: dict

    def __getattr__(self, name):
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclasses.dataclass(frozen=True)
class Section:
    values: dict

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def load_config(path=None, overrides=None, check_files=True):
    """Read path (or only the defaults when None), apply overrides {(section, key): text}, check it all.

    check_files=False skips check_paths, for a configuration meant for another machine.
    """
    parser = configparser.ConfigParser(interpolation=None)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as error:
            raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"configuration file {path} is not UTF-8 text: {error.reason}") from None
        except configparser.Error as error:
            message = " ".join(str(error).split())  # one line, whatever configparser wrote
            raise ConfigError(f"configuration file {path} is not valid INI: {message}") from None
    for (section, key), text in (overrides or {}).items():
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, text)

    sections = {}
    for section in parser.sections():
        if section not in SCHEMA:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(SCHEMA)})")
        for key in parser[section]:
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"unknown key [{section}] {key} (known: {', '.join(SCHEMA[section])})"
                )
    for section, keys in SCHEMA.items():
        values = {}
        for key, (parse, default) in keys.items():
            text = parser.get(section, key, fallback=default)
            try:
                values[key] = parse(text)
            except ValueError as error:
                raise ConfigError(f"bad value for [{section}] {key} = {_redacted(text)!r}: {error}") from None
        sections[section] = Section(values)
    config = Config(sections)
    check_rules(config)
    if check_files:
        check_paths(config)
    return config


# -- rules between keys -------------------------------------------------------------


def check_rules(config):
    """Refuse combinations of values that cannot work; values only (check_paths looks at files)."""
    _check_security(config)
    _check_stager(config)
    _check_transfer(config)
    _check_events(config)
    if config.transfer.backend == "fts":
        _check_fts(config.fts)
    _check_fleet(config.fleet)


def _check_fleet(section):
    if section.stale_after < 2 * section.heartbeat:
        raise ConfigError(f"[fleet] stale_after = {section.stale_after:g} must be at least twice [fleet] heartbeat"
                          f" ({section.heartbeat:g}): a daemon that misses one beat is not dead")


def _check_security(config):
    """Never an unauthenticated API beyond loopback; no authentication set up that cannot work."""
    auth, api = config.auth, config.api
    if auth.x509_ca_path and not api.tls_cert:
        raise ConfigError("[auth] x509_ca_path needs [api] tls_cert and tls_key: client certificates come with TLS")
    if auth.token_issuers and not auth.token_audiences:
        raise ConfigError("[auth] token_issuers needs [auth] token_audiences (the aud values meaning this service)")
    if auth.voms_dir and not auth.x509_ca_path:
        raise ConfigError("[auth] voms_dir needs [auth] x509_ca_path: VOMS attributes come with client proxies")
    if auth.stager_dns and not auth.x509_ca_path:
        raise ConfigError("[auth] stager_dns needs [auth] x509_ca_path: stagers are known by their certificates")
    if api.tls_cert and api.endpoint.kind not in ("tcp", "tcp6"):
        raise ConfigError("[api] tls_cert needs a tcp: or tcp6: [api] endpoint (transferd adds TLS itself)")
    if api.tls_key and not api.tls_cert:
        raise ConfigError("[api] tls_key is set but [api] tls_cert is not")
    if not api.endpoint.local_only and not (api.tls_cert and (auth.x509_ca_path or auth.token_issuers)):
        raise ConfigError(
            f"refusing to listen on {api.endpoint} without authentication: beyond loopback, transferd needs"
            " TLS ([api] tls_cert, tls_key) and a way to know who is asking ([auth] x509_ca_path for client"
            " certificates, [auth] token_issuers and token_audiences for bearer tokens); see conf/transferd.ini."
            " To stay local, listen on tcp:PORT:interface=127.0.0.1"
        )


def _stager_uses_tls_keys(section):
    """cert, key and ca_path matter to the Tape REST stager, and to the callback stager over https."""
    return section.backend == "taperest" or (section.backend == "callback" and (section.url or "").startswith("https:"))


def _check_stager(config):
    section = config.stager
    if section.backend == "callback" and not section.url:
        raise ConfigError("[stager] url is required with backend = callback (e.g. http://stager:8081/stage)")
    if section.backend == "taperest":
        if not section.url:
            raise ConfigError("[stager] url must name the Tape REST endpoint or its site for backend = taperest")
        if not posixpath.isabs(section.archive_root):
            raise ConfigError(
                f"[stager] archive_root = {section.archive_root!r}: with backend = taperest it must be the absolute "
                "tape namespace directory that holds the products (e.g. /pnfs/example.org/data/meerkat)"
            )
        if section.namespace_mount and not os.path.isabs(section.namespace_mount):
            raise ConfigError(f"[stager] namespace_mount = {section.namespace_mount!r} must be an absolute "
                              "directory: where this machine mounts archive_root (e.g. /mnt/pnfs/data/meerkat)")
    if _stager_uses_tls_keys(section) and section.key and not section.cert:
        raise ConfigError("[stager] key is set but cert is not")


def _check_transfer(config):
    backend = config.transfer.backend
    schemes = MOVER_SCHEMES[backend]
    unsupported = set(config.transfer.allowed_schemes) - schemes
    if unsupported:
        raise ConfigError(
            f"[transfer] allowed_schemes lists {', '.join(sorted(unsupported))}, which the "
            f"{backend} mover cannot write (it can: {', '.join(sorted(schemes))})"
        )


def _check_events(config):
    events = config.events
    if events.retry_delay > events.max_retry_delay:
        raise ConfigError(f"[events] retry_delay = {events.retry_delay:g} exceeds max_retry_delay ="
                          f" {events.max_retry_delay:g}: the first wait cannot be longer than the longest")
    if events.exchange and config.queue.url.scheme not in ("amqp", "amqps"):
        raise ConfigError("[events] exchange needs an amqp:// or amqps:// [queue] url: events are published to RabbitMQ")
    if events.exchange and any(char.isspace() for char in events.exchange):
        raise ConfigError(f"[events] exchange = {events.exchange!r} must be one word (an exchange name)")


def _check_fts(section):
    if not section.endpoint:
        raise ConfigError("[transfer] backend = fts needs [fts] endpoint (e.g. https://fts3.example.org:8446)")
    if section.auth == "token" and not section.token_file:
        raise ConfigError("[fts] auth = token needs [fts] token_file")
    if section.auth == "x509":
        if not (section.proxy or section.cert):
            raise ConfigError("[fts] auth = x509 needs [fts] proxy, or cert and key")
        if not section.endpoint.startswith("https://"):
            raise ConfigError("[fts] auth = x509 needs an https:// [fts] endpoint")
    try:
        section.source_template.format(staged_to="host.example.org", path="/staged/product")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"bad value for [fts] source_template = {section.source_template!r}: "
                          f"use {{staged_to}} and {{path}} only ({error})") from None


# -- files and directories ------------------------------------------------------------


def check_paths(config):
    """Refuse files and directories that are missing or cannot be what the configuration says.

    Only whether they are there: the backends load certificates and keys
    themselves, and say so when one cannot be used.
    """
    api, auth = config.api, config.auth
    _is_file(api.tls_cert, "[api] tls_cert")
    _is_file(api.tls_key, "[api] tls_key")
    _exists(auth.x509_ca_path, "[auth] x509_ca_path")
    if auth.voms_dir and not os.path.isdir(auth.voms_dir):
        raise ConfigError(f"[auth] voms_dir = {auth.voms_dir!r} is not a directory")
    if auth.audit_log:
        if os.path.isdir(auth.audit_log):
            raise ConfigError(f"[auth] audit_log = {auth.audit_log!r} is a directory, not a file")
        directory = os.path.dirname(os.path.abspath(auth.audit_log))
        if not os.path.isdir(directory):
            raise ConfigError(f"[auth] audit_log = {auth.audit_log!r}: its directory {directory} does not exist")
    _check_event_secrets(config.events)
    archive = config.retention.archive
    if archive:
        if os.path.isdir(archive):
            raise ConfigError(f"[retention] archive = {archive!r} is a directory, not a file")
        if not os.path.isdir(os.path.dirname(os.path.abspath(archive))):
            raise ConfigError(f"[retention] archive = {archive!r}: its directory does not exist")
    url = config.database.url
    if url.scheme == "sqlite":
        if os.path.isdir(url.path):
            raise ConfigError(f"[database] url = {str(url)!r} names a directory, not a database file")
        _can_create(os.path.dirname(os.path.abspath(url.path)), f"[database] url = {str(url)!r}")

    stager = config.stager
    if stager.backend == "local":
        if not os.path.isdir(stager.archive_root):
            raise ConfigError(f"[stager] archive_root {stager.archive_root!r} is not a directory")
        _can_create(stager.staging_root, f"[stager] staging_root = {stager.staging_root!r}")
    if _stager_uses_tls_keys(stager):
        for key in ("cert", "key", "ca_path"):
            _exists(getattr(stager, key), f"[stager] {key}")
    if stager.backend == "taperest" and stager.token_file and not os.path.isfile(stager.token_file):
        raise ConfigError(f"[stager] token_file {stager.token_file!r} is not a file")

    fts = config.fts
    if config.transfer.backend == "fts":
        for key in ("cert", "key", "proxy", "ca_path"):
            _exists(getattr(fts, key), f"[fts] {key}")
        if fts.auth == "token" and not os.path.isfile(fts.token_file):
            raise ConfigError(f"[fts] token_file {fts.token_file!r} is not a file")


def _check_event_secrets(events):
    """The webhook secret files are there and hold whsec_ secrets (transferd.events.read_secrets)."""
    from transferd.events import read_secrets

    for name, path in [(f"[events] subscribers ({s.name})", s.secret_file) for s in events.subscribers] + (
            [("[events] notify_secret_file", events.notify_secret_file)] if events.notify_secret_file else []):
        try:
            read_secrets(path)
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None


def _exists(path, name):
    if path and not os.path.exists(path):
        raise ConfigError(f"{name} = {path!r} does not exist")


def _is_file(path, name):
    if path and not os.path.isfile(path):
        raise ConfigError(f"{name} = {path!r} is not a file")


def _can_create(directory, name):
    """directory is there, or can be made: the nearest existing ancestor is a writable directory."""
    existing = os.path.abspath(directory)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{name}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {existing} is not writable")
