"""The exit codes of transferctl and the one error it raises.

When several apply (refused items and failed jobs in one run, say), the
largest wins, so a script can test for the worst thing that happened.
"""

OK = 0
JOBS_FAILED = 1  # some watched jobs ended in ERROR or CANCELLED
TIMED_OUT = 2  # --timeout passed before every watched job ended
USAGE = 3  # bad command line or input file: nothing was sent
REFUSED = 4  # the server refused the request or some of its items (400, 404, 409, 413, 415, 422)
CREDENTIALS = 5  # no usable credential, or the server did not accept it (401)
FORBIDDEN = 6  # the server knows who is asking and does not allow it (403)
UNREACHABLE = 7  # transferd cannot be reached or is unavailable (connection, TLS, time-out, 5xx)
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

EXIT_CODES = {
    OK: "success",
    JOBS_FAILED: "some jobs ended in ERROR or CANCELLED",
    TIMED_OUT: "--timeout passed before every job ended",
    USAGE: "bad command line or input file (nothing was sent)",
    REFUSED: "the server refused the request or some of its items (bad input, not found, conflict)",
    CREDENTIALS: "no usable credential, or the server did not accept it (401)",
    FORBIDDEN: "not allowed (403)",
    UNREACHABLE: "transferd cannot be reached or is unavailable",
    INTERRUPTED: "interrupted (Ctrl-C)",
}


class CLIError(Exception):
    """A failure told to the user as one line on stderr, and the exit code that goes with it."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def exit_code_for_status(status):
    """The exit code of an HTTP error status."""
    if status == 401:
        return CREDENTIALS
    if status == 403:
        return FORBIDDEN
    if status >= 500 or status == 429:
        return UNREACHABLE
    return REFUSED
