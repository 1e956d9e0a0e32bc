"""Checks on what users send, with messages a person can act on.

Each check raises BadRequest whose message goes back to the client as is.
"""

import os
import re
from urllib.parse import unquote, urlsplit

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
