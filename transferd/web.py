"""The HTTP site: a Request that never buffers more than the body limit.

twisted.web buffers whole request bodies and has no limit of its own; this
Request keeps at most max_body_bytes + 1 bytes, so the API can answer 413
without a large upload ever sitting in memory.
"""

import functools

from twisted.web import http, server

# twisted.web parses every POST's Content-Type with the email package, about
# 44 µs a request, a fifth of the daemon's CPU per submission (see
# docs/benchmarks.md). The values repeat, so a small cache removes the cost.
# The function is private to Twisted, hence the guard.
if hasattr(http, "_parseContentType") and not hasattr(http._parseContentType, "cache_info"):
    http._parseContentType = functools.lru_cache(maxsize=64)(http._parseContentType)


class LimitedRequest(server.Request):
    max_body_bytes = 65536

    def gotLength(self, length):
        # Never let a declared length pick a temporary file or a large buffer.
        super().gotLength(min(length, self.max_body_bytes + 1) if length is not None else None)

    def handleContentChunk(self, data):
        room = self.max_body_bytes + 1 - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


class LimitedSite(server.Site):
    def __init__(self, resource, max_body_bytes, timeout=60, access_log=True, **kwargs):
        super().__init__(resource, requestFactory=self._factory(max_body_bytes), timeout=timeout, **kwargs)
        self.access_log = access_log

    def log(self, request):
        """One access line per request, unless [api] access_log is off (the daemon logs each job anyway)."""
        if self.access_log:
            super().log(request)

    @staticmethod
    def _factory(max_body_bytes):
        return type("Request", (LimitedRequest,), {"max_body_bytes": max_body_bytes})

