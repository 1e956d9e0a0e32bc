"""The HTTP site: a Request that never buffers more than the body limit.

twisted.web buffers whole request bodies and has no limit of its own; this
Request keeps at most max_body_bytes + 1 bytes, so the API can answer 413
without a large upload ever sitting in memory.
"""

from twisted.web import server


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
    def __init__(self, resource, max_body_bytes, timeout=60, **kwargs):
        super().__init__(resource, requestFactory=self._factory(max_body_bytes), timeout=timeout, **kwargs)

    @staticmethod
    def _factory(max_body_bytes):
        return type("Request", (LimitedRequest,), {"max_body_bytes": max_body_bytes})

