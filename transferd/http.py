"""HTTP client helpers."""


def describe(error):
    """A short human description of why a request failed (treq/Agent wrap the real causes in a list)."""
    reasons = getattr(error, "reasons", None)  # ResponseNeverReceived, RequestTransmissionFailed...
    if reasons:
        return "; ".join(describe(reason.value) for reason in reasons)
    return str(error) or type(error).__name__
