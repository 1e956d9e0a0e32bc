"""Configuration: an INI file read with configparser, checked key by key.

Every key has a parser and a default; the defaults are the embedded set-up
(SQLite, in-process queue, local stager and mover).  An unknown section or
key, or a value that does not parse, stops start-up with a message naming it.
conf/transferd.ini documents every key; tests/test_config.py checks that the
two agree.
"""

import configparser
import dataclasses
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number of seconds, zero or more")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number of seconds greater than zero")
    return value


def _text(text):
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _url(*schemes):
    def parse(text):
        text = text.strip()
        scheme = urlsplit(text).scheme
        if scheme not in schemes:
            raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return text

    return parse


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


def _host_list(text):
    """Destination host patterns (see transferd.validation.DestinationRules), checked at start-up."""
    from transferd.validation import host_pattern

    patterns = _case_list(text)
    for pattern in patterns:
        host_pattern(pattern)
    return patterns


def _issuer_lines(text):
    """Lines "ISSUER JWKS": a trusted token issuer and where its keys are (https:// URL or a file)."""
    issuers = {}
    for line in _lines(text):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"each line must be 'ISSUER JWKS' (issuer, space, JWKS URL or file), not {line!r}")
        issuer, jwks = parts
        if issuer in issuers:
            raise ValueError(f"issuer {issuer} is listed twice")
        issuers[issuer] = jwks
    return issuers


def _choice(*choices):
    def parse(text):
        text = text.strip()
        if text not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return text

    return parse


# section -> key -> (parser, default text)
SCHEMA = {
    "api": {
        "endpoint": (_text, "tcp:8080:interface=127.0.0.1"),
        "public_url": (_url("http", "https"), "http://127.0.0.1:8080"),
        "max_body_bytes": (_positive_int, "65536"),
        "max_header_bytes": (_positive_int, "16384"),
        "idle_timeout": (_positive_float, "60"),
        "connection_timeout": (_positive_float, "600"),
        "max_connections_per_peer": (_positive_int, "100"),
        "tls_cert": (_optional_text, ""),
        "tls_key": (_optional_text, ""),
        "access_log": (_boolean, "true"),
    },
    "auth": {
        "x509_ca_path": (_optional_text, ""),
        "token_issuers": (_issuer_lines, ""),
        "token_audiences": (_case_list, ""),
        "jwks_refresh": (_positive_float, "3600"),
        "admins": (_lines, ""),
        "stager_dns": (_lines, ""),
        "audit_log": (_optional_text, ""),
    },
    "database": {
        "url": (_url("sqlite", "mysql"), "sqlite:///transferd-data/transferd.sqlite"),
    },
    "queue": {
        "url": (_url("memory", "amqp", "amqps"), "memory://"),
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
        "url": (_optional_url("http", "https"), ""),
        "retry_delay": (_positive_float, "2"),
        "bulk_size": (_positive_int, "100"),
        "poll_interval": (_positive_float, "30"),
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
        "vo": (_optional_text, ""),
        "source_template": (_text, "gsiftp://{staged_to}{path}"),
        "poll_interval": (_positive_float, "30"),
        "bulk_size": (_positive_int, "100"),
        "transfer_timeout": (_positive_float, "86400"),
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


def load_config(path=None, overrides=None):
    """Read path (or only the defaults when None), apply overrides {(section, key): text}."""
    parser = configparser.ConfigParser(interpolation=None)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as error:
            raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
        except configparser.Error as error:
            raise ConfigError(f"configuration file {path} is not valid INI: {error}") from None
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
                raise ConfigError(f"bad value for [{section}] {key} = {text!r}: {error}") from None
        sections[section] = Section(values)
    return Config(sections)
