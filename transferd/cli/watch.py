"""`transferctl watch`: follow jobs until they end, as `globus task wait` does.

Each round asks for every job that has not ended (GET /api/v1/jobs/{id}:
its state, what it waits for and its ETA), shows the result, and sleeps
--interval. Three ways to show it: a live view on a terminal (rich: one line
and bar per job, an overall bar), plain lines when stdout is not a terminal
(one per change), and JSON lines with --json (the job view, one per change).

Exit codes: 0 every job SUCCESS, 1 some ERROR or CANCELLED, 2 --timeout.
"""

import json
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from transferd.cli import output
from transferd.cli.errors import JOBS_FAILED, OK, TIMED_OUT, CLIError

STATE_STYLE = {"SUCCESS": "green", "ERROR": "bold red", "CANCELLED": "yellow", "TRANSFERRING": "cyan",
               "STAGED": "blue", "STAGING": "magenta", "SUBMITTED": "white"}


def watch(client, job_ids, display, interval, timeout, clock=time.monotonic, sleep=time.sleep):
    """Follow job_ids until every one has ended or timeout seconds (None: no limit) have passed; the exit code."""
    views = {job_id: None for job_id in dict.fromkeys(job_ids)}
    started = clock()
    with display:
        while True:
            for job_id, view in views.items():
                if view is None or view["status"] not in output.TERMINAL:
                    views[job_id] = fetch(client, job_id)
            display.show(list(views.values()), clock() - started)
            if all(view["status"] in output.TERMINAL for view in views.values()):
                display.finish(list(views.values()), clock() - started)
                break
            left = None if timeout is None else started + timeout - clock()
            if left is not None and left <= 0:
                display.finish(list(views.values()), clock() - started)
                active = sum(1 for view in views.values() if view["status"] not in output.TERMINAL)
                raise CLIError(f"timed out after {timeout:g} s: {active} of {len(views)} job(s) have not ended",
                               TIMED_OUT)
            sleep(interval if left is None else min(interval, left))
    return OK if all(view["status"] == "SUCCESS" for view in views.values()) else JOBS_FAILED


def fetch(client, job_id):
    try:
        return client.call("GET", f"/api/v1/jobs/{job_id}")
    except CLIError as error:
        raise CLIError(f"{job_id}: {error.message}", error.exit_code) from None


def display_for(as_json, stream=None):
    stream = stream or sys.stdout
    if as_json:
        return JsonDisplay(stream)
    console = Console(file=stream)
    return LiveDisplay(console) if console.is_terminal else PlainDisplay(stream)


class _ChangesDisplay:
    """Writes something for each job whose state or reason changed since the last round."""

    def __init__(self, stream):
        self.stream = stream
        self.seen = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def show(self, views, elapsed):
        for view in views:
            key = (view["status"], output.what_now(view))
            if self.seen.get(view["job_id"]) != key:
                self.seen[view["job_id"]] = key
                self.write(view)
        self.stream.flush()

    def finish(self, views, elapsed):
        pass


class PlainDisplay(_ChangesDisplay):
    def write(self, view):
        print(output.change_line(view), file=self.stream)

    def finish(self, views, elapsed):
        print(output.tally(views), file=self.stream, flush=True)


class JsonDisplay(_ChangesDisplay):
    def write(self, view):
        print(json.dumps(view), file=self.stream)


class LiveDisplay:
    """The terminal view, redrawn after each round: a line per job (as many as fit) and an overall bar."""

    def __init__(self, console):
        self.console = console
        self.live = Live(console=console, auto_refresh=False, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)

    def show(self, views, elapsed):
        self.live.update(self.render(views, f"{output.duration(elapsed)} so far"), refresh=True)

    def finish(self, views, elapsed):
        self.live.update(self.render(views, f"{output.duration(elapsed)} in all"), refresh=True)

    def render(self, views, elapsed):
        room = max(1, self.console.size.height - 3)
        shown = sorted(views, key=lambda view: view["status"] in output.TERMINAL)[:room]
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(width=8)  # the job id's first 8 characters
        table.add_column(min_width=10, max_width=24, no_wrap=True, overflow="ellipsis")  # product
        table.add_column(width=12)  # state
        table.add_column(width=12)  # bar
        table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")  # what it waits for, or how it ended
        table.add_column(no_wrap=True)  # ETA
        for view in shown:
            status = view["status"]
            table.add_row(
                view["job_id"][:8],
                Text(view.get("product_id", "")),  # Text: never read as rich markup
                Text(status, style=STATE_STYLE.get(status, "")),
                ProgressBar(total=output.STEPS, completed=output.step(view), width=12,
                            complete_style="red" if status in ("ERROR", "CANCELLED") else "bar.complete"),
                Text(output.what_now(view)),
                Text("ETA " + output.until(view.get("eta")) if view.get("eta") and status not in output.TERMINAL
                     else ""),
            )
        ended = sum(1 for view in views if view["status"] in output.TERMINAL)
        words = f"{ended}/{len(views)} ended: {output.counts(views)}"
        if output.overall_eta(views):
            words += f"; ETA {output.until(output.overall_eta(views))}"
        words += f" ({elapsed})"
        summary = Table.grid(padding=(0, 1))
        summary.add_row(Text("overall", style="bold"), ProgressBar(total=len(views), completed=ended, width=30),
                        Text(words, no_wrap=True, overflow="ellipsis"))
        parts = [table]
        if len(shown) < len(views):
            parts.append(Text(f"... and {len(views) - len(shown)} more job(s)", style="dim"))
        parts.append(summary)
        return Group(*parts)
