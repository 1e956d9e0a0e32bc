"""transferctl's commands (click) and its one entry point, main(), which turns every failure into one line.

Plain output is for people; --json gives the API's own documents as JSON
lines (one JSON document per line), for scripts.
"""

import datetime
import json
import os
import re
import sys
import uuid
from urllib.parse import quote

import click

from transferd.cli import credentials, jobfile, output, watch as watching
from transferd.cli.client import DEFAULT_URL, Client
from transferd.cli.errors import EXIT_CODES, INTERRUPTED, OK, USAGE, CLIError

INTERNAL = 70  # a bug in transferctl (sysexits' EX_SOFTWARE); the line says what to report
BATCH_SIZE = 1000  # jobs per POST /api/v1/jobs; the server's [api] max_batch is 10,000 by default
PAGE_SIZE = 1000  # the most GET /api/v1/jobs gives in one page
FILTERS = {  # option name -> API parameter, shared by list and cancel
    "status": "status", "product": "product_id", "label": "label", "destination_host": "destination_host",
    "submitter": "submitter", "since": "submitted_after", "until": "submitted_before",
}
RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Run:
    """What one command needs: where the server is, how to write, and a client made on first use."""

    def __init__(self, url, as_json):
        self.url = url
        self.as_json = as_json
        self._client = None
        self.exit_code = OK

    @property
    def client(self):
        if self._client is None:
            self._client = Client(self.url, credentials.find())
        return self._client

    def emit(self, document):
        click.echo(json.dumps(document))

    def failed(self, error, prefix=""):
        """Say a failure that does not stop the command (one job of several); the exit code keeps the worst."""
        say(f"{prefix}{error.message}")
        self.exit_code = max(self.exit_code, error.exit_code)

    def each_job(self, method, job_ids, text):
        """Send method to each job in turn and show the view it answers (text(view), or JSON); one that fails
        is one line and does not stop the others. The exit code."""
        for job_id in job_ids:
            try:
                view = self.client.call(method, f"/api/v1/jobs/{job_id}")
            except CLIError as error:
                self.failed(error, prefix=f"{job_id}: ")
                continue
            if self.as_json:
                self.emit(view)
            else:
                click.echo(text(view))
        return self.exit_code

    def close(self):
        if self._client is not None:
            self._client.close()


def say(line):
    click.echo(f"transferctl: {line}", err=True)


def common(command):
    """--url and --json, on every command."""
    command = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable output: JSON lines, one document per line.")(command)
    command = click.option("--url", envvar="TRANSFERD_URL", default=DEFAULT_URL, show_default=True,
                           help="transferd's address (or set TRANSFERD_URL).")(command)
    return command


def filter_options(command):
    """The job filters of GET /api/v1/jobs, shared by list and cancel."""
    for name, text in reversed([
        ("--status", "States, comma separated (SUBMITTED, STAGING, STAGED, TRANSFERRING, SUCCESS, ERROR, CANCELLED)."),
        ("--product", "Jobs of this product."),
        ("--label", "Jobs with this label."),
        ("--destination-host", "Jobs delivering to this host."),
        ("--submitter", "Jobs of this submitter (admins only)."),
        ("--since", "Submitted at or after: an ISO 8601 time (local time without a zone) or an age (30m, 2h, 7d)."),
        ("--until", "Submitted before: a time or an age, as for --since."),
    ]):
        command = click.option(name, help=text, multiple=(name == "--status"))(command)
    return command


def api_filters(values, now=None):
    """The API's query parameters for the filter options given."""
    params = {}
    for option, parameter in FILTERS.items():
        value = values.get(option)
        if not value:
            continue
        if option == "status":
            value = ",".join(part.strip().upper() for item in value for part in item.split(",") if part.strip())
        elif option in ("since", "until"):
            value = api_time(value, f"--{option}", now)
        params[parameter] = value
    return params


def api_time(text, option, now=None):
    """An ISO 8601 UTC time (2026-12-02T10:00:00Z) from a time or an age ("2h": two hours ago)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    relative = RELATIVE.match(text.strip())
    if relative:
        when = now - datetime.timedelta(seconds=int(relative.group(1)) * UNIT_SECONDS[relative.group(2)])
    else:
        try:
            when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise CLIError(f"{option} {text!r} is neither a time (2026-12-02T10:00:00Z, 2026-12-02) "
                           "nor an age (30m, 2h, 7d)", USAGE) from None
        if when.tzinfo is None:
            when = when.astimezone()  # local time, as a person typing a time means it
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items()))
@click.version_option(package_name="transferd", prog_name="transferctl")
def cli():
    """Submit, find, follow and cancel transferd jobs.

    Credentials are found as the grid tools find them: X509_USER_PROXY,
    /tmp/x509up_u<uid>, ~/.globus/usercert.pem and userkey.pem (on https
    URLs, verified against X509_CERT_DIR); bearer tokens in BEARER_TOKEN,
    BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid> or /tmp/bt_u<uid>.
    """


@cli.command()
@click.argument("product", required=False)
@click.argument("destination", required=False)
@click.option("--file", "job_file", type=click.File("r", encoding="utf-8"),
              help="Jobs from FILE ('-' for stdin): CSV with a header (product_id,destination_path[,priority,"
                   "label,metadata]) or JSON lines.")
@click.option("--priority", type=int, help="1 (lowest) to 5 (highest); the server's default is 3.")
@click.option("--label", help="A label to find the jobs by later (list --label).")
@click.option("--metadata", help="A JSON object kept with each job.")
@click.option("--batch-size", type=click.IntRange(1, 10000), default=BATCH_SIZE, show_default=True,
              help="Jobs per request.")
@click.option("--wait", is_flag=True, help="Then watch the jobs until they end (exit codes as watch).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="With --wait: give up after SECONDS.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="With --wait: seconds between looks.")
@common
def submit(product, destination, job_file, priority, label, metadata, batch_size, wait, timeout, interval, url,
           as_json):
    """Ask for PRODUCT to be delivered to DEST, or for every job in --file.

    Prints the id of each accepted job, one a line (--json: one result per
    item). Each request carries its own submission id, so one repeated after
    a lost answer creates nothing twice.
    """
    defaults = {}
    if priority is not None:
        defaults["priority"] = priority
    if label is not None:
        defaults["label"] = label
    if metadata is not None:
        defaults["metadata"] = jobfile.parse_metadata(metadata, "--metadata")
    if job_file is not None:
        if product or destination:
            raise click.UsageError("give PRODUCT DEST or --file, not both")
        items = jobfile.read(job_file, "stdin" if job_file.name == "<stdin>" else job_file.name, defaults)
    elif product and destination:
        items = jobfile.from_arguments(product, destination, defaults)
    else:
        raise click.UsageError("give PRODUCT and DEST, or --file FILE")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout goes with --wait")
    run = current_run(url, as_json)
    accepted = submit_items(run, items, batch_size)
    if wait and accepted:
        code = watching.watch(run.client, accepted, watching.display_for(as_json), interval, timeout)
        run.exit_code = max(run.exit_code, code)
    return run.exit_code


def submit_items(run, items, batch_size):
    """POST the items in batches; print each result as its batch is answered; the accepted job ids."""
    accepted = []
    refused = 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        submission_id = str(uuid.uuid4())
        try:
            answer = run.client.call("POST", "/api/v1/jobs", repeatable=True,
                                     body={"jobs": [item.job for item in batch], "submission_id": submission_id})
        except CLIError as error:
            if start:
                error.message += (f" (the first {start} of {len(items)} jobs were submitted, their ids printed "
                                  f"above; the other {len(items) - start} were not)")
            raise
        for result in answer["results"]:
            item = batch[result["index"]]
            where = f"line {item.line} ({item.job['product_id']})" if item.line else item.job["product_id"]
            if run.as_json:
                run.emit({**result, "index": start + result["index"], "line": item.line,
                          "product_id": item.job["product_id"], "destination_path": item.job["destination_path"],
                          "submission_id": submission_id})
            if "job_id" in result:
                accepted.append(result["job_id"])
                if not run.as_json:
                    click.echo(result["job_id"])
            else:
                refused += 1
                error = result["error"]
                run.failed(run.client.http_error(error.get("status", 400), error),
                           prefix=f"{where} refused: ")
    if len(items) > 1 and not run.as_json:
        say(f"submitted {len(accepted)} of {len(items)} jobs" + (f"; {refused} refused" if refused else ""))
    return accepted


@cli.command()
@click.argument("job_ids", metavar="JOB...", nargs=-1, required=True)
@common
def status(job_ids, url, as_json):
    """Show each job: its state, what it waits for, its ETA."""
    return current_run(url, as_json).each_job("GET", job_ids, output.status_block)


@cli.command(name="list")
@filter_options
@click.option("--updated-after", help="Changed at or after: a time or an age, as for --since.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="At most this many jobs, newest first.")
@click.option("--all", "every", is_flag=True, help="Every matching job (streamed; no --limit).")
@common
def list_jobs(updated_after, limit, every, url, as_json, **filters):
    """List jobs, newest first, that match every filter given."""
    params = api_filters(filters)
    if updated_after:
        params["updated_after"] = api_time(updated_after, "--updated-after")
    run = current_run(url, as_json)
    views = run.client.lines("/api/v1/jobs", params) if every else pages(run.client, params, limit)
    shown = 0
    for view in views:
        if as_json:
            run.emit(view)
            continue
        if not shown:
            click.echo(output.LIST_HEADER)
        click.echo(output.list_row(view))
        shown += 1
    if not shown and not as_json:
        say("no job matches")
    return run.exit_code


def pages(client, params, limit):
    """Up to limit jobs, following the cursor from page to page."""
    left = limit
    cursor = None
    while left > 0:
        page = client.call("GET", "/api/v1/jobs", {**params, "limit": min(left, PAGE_SIZE),
                                                  **({"cursor": cursor} if cursor else {})})
        yield from page["jobs"][:left]
        left -= len(page["jobs"])
        cursor = page.get("next")
        if not cursor or not page["jobs"]:
            return


@cli.command()
@click.argument("job_id", metavar="JOB")
@common
def history(job_id, url, as_json):
    """Every change of JOB: time, change, who made it and why."""
    run = current_run(url, as_json)
    view = run.client.call("GET", f"/api/v1/jobs/{job_id}")
    for event in view.get("history", []):
        if as_json:
            run.emit(event)
        else:
            click.echo(output.history_row(event))
    return run.exit_code


@cli.command()
@click.argument("job_ids", metavar="[JOB...]", nargs=-1)
@filter_options
@common
def cancel(job_ids, url, as_json, **filters):
    """Cancel the jobs named, or every active job matching the filters (your own; admins: anyone's).

    Prints the id of each job cancelled, one a line.
    """
    params = api_filters(filters)
    if not job_ids and not params:
        raise click.UsageError("name the jobs to cancel, or give a filter such as --status STAGING")
    run = current_run(url, as_json)
    if params:
        answer = run.client.call("POST", "/api/v1/jobs/cancel", body={**params, **({"job_ids": list(job_ids)}
                                                                                   if job_ids else {})})
        if as_json:
            run.emit(answer)
        else:
            for job_id in answer.get("job_ids", []):
                click.echo(job_id)
            say(f"cancelled {answer['cancelled']} job(s)")
        return run.exit_code
    return run.each_job("DELETE", job_ids, lambda view: view["job_id"])


@cli.command()
@click.argument("job_ids", metavar="JOB...", nargs=-1, required=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Give up after SECONDS (exit 2).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between looks.")
@common
def watch(job_ids, timeout, interval, url, as_json):
    """Follow jobs until they end: a live view on a terminal, a line per change otherwise.

    Exit 0 when every job ended in SUCCESS, 1 when some ended in ERROR or
    CANCELLED, 2 when --timeout passed first.
    """
    run = current_run(url, as_json)
    return watching.watch(run.client, job_ids, watching.display_for(as_json), interval, timeout)


@cli.command()
@common
def whoami(url, as_json):
    """Who transferd takes you for, and whether you are an admin."""
    run = current_run(url, as_json)
    answer = run.client.call("GET", "/api/v1/whoami")
    presented = run.client.credentials.describe()
    if as_json:
        run.emit({**answer, "presented": presented})
        return run.exit_code
    if answer.get("identity"):
        click.echo(f"identity   {answer['identity']}")
        click.echo(f"method     {answer.get('method')}")
    else:
        click.echo("identity   (anonymous: this transferd does not authenticate)")
    click.echo(f"admin      {'yes' if answer.get('admin') else 'no'}")
    click.echo(f"presented  {presented}")
    click.echo(f"server     {run.client.url}")
    return run.exit_code


@cli.group()
def admin():
    """Operators' commands (admins only): the daemons sharing the database, draining them."""


@admin.command(name="status")
@common
def admin_status(url, as_json):
    """The daemons (host, pid, version, state, jobs held, last heartbeat) and the jobs in each state."""
    run = current_run(url, as_json)
    fleet = run.client.call("GET", "/api/v1/daemons")
    if as_json:
        run.emit(fleet)
        return run.exit_code
    click.echo(output.DAEMONS_HEADER)
    for daemon in fleet["daemons"]:
        click.echo(output.daemon_row(daemon))
    click.echo("jobs: " + output.job_counts(fleet["jobs"]))
    return run.exit_code


@admin.command()
@click.argument("name", metavar="HOST")
@common
def drain(name, url, as_json):
    """Make the daemons on HOST (or the one with this daemon id) take no new work; they finish what they hold.

    Each follows on its next heartbeat; `admin status` shows "drained" once one holds no job and can be stopped.
    """
    return _set_drain(name, url, as_json, "PUT")


@admin.command()
@click.argument("name", metavar="HOST")
@common
def undrain(name, url, as_json):
    """Let the daemons on HOST (or the one with this daemon id) take new work again."""
    return _set_drain(name, url, as_json, "DELETE")


def _set_drain(name, url, as_json, method):
    run = current_run(url, as_json)
    answer = run.client.call(method, f"/api/v1/daemons/{quote(name, safe='')}/drain")
    if as_json:
        run.emit(answer)
        return run.exit_code
    for daemon in answer["daemons"]:
        click.echo(output.daemon_row(daemon))
    return run.exit_code


def current_run(url, as_json):
    """The Run of this command, closed when the command ends."""
    context = click.get_current_context()
    run = Run(url, as_json)
    context.call_on_close(run.close)
    return run


def main(argv=None):
    """The console script: run one command; every failure is one line on stderr and an exit code."""
    try:
        code = cli.main(args=argv, prog_name="transferctl", standalone_mode=False)
    except CLIError as error:
        say(error.message)
        code = error.exit_code
    except click.UsageError as error:
        where = error.ctx.command_path if error.ctx else "transferctl"
        click.echo(f"{where}: {error.format_message()} (see {where} --help)", err=True)
        code = USAGE
    except click.exceptions.Exit as done:  # --help, --version
        code = done.exit_code
    except (KeyboardInterrupt, click.Abort):  # click has already ended the line the terminal was on
        say("interrupted")
        code = INTERRUPTED
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = OK
    except click.ClickException as error:  # e.g. a --file that cannot be opened
        say(error.format_message())
        code = USAGE
    except Exception as error:  # a bug: still one line, never a traceback
        say(f"internal error ({type(error).__name__}: {error}); please report it with the command you ran")
        code = INTERNAL
    sys.exit(code if isinstance(code, int) else OK)
