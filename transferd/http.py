"""HTTP client helpers."""

import json


def describe(error):
    """A short human description of why a request failed (treq/Agent wrap the real causes in a list)."""
    reasons = getattr(error, "reasons", None)  # ResponseNeverReceived, RequestTransmissionFailed...
    if reasons:
        return "; ".join(describe(reason.value) for reason in reasons)
    return str(error) or type(error).__name__


def answer_message(body, limit=500):
    """The server's own words from an answer body: its JSON "msg", else the text, shortened."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("msg"), str):
        text = data["msg"]
    return text[:limit] or "(no message)"
