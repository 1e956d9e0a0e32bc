"""How transferctl shows jobs to a person: plain text, one line per row, nothing held back for alignment.

(--json output is the API's own documents, written by main.emit.)
"""

import datetime
import json

# How far along a job is, out of STEPS: the bars of `watch`.
STEPS = 4
STEP = {"SUBMITTED": 0, "STAGING": 1, "STAGED": 2, "TRANSFERRING": 3, "SUCCESS": 4}
TERMINAL = frozenset({"SUCCESS", "ERROR", "CANCELLED"})
LIST_HEADER = f"{'JOB':36}  {'STATUS':12}  {'SUBMITTED':20}  {'PRODUCT':16}  DESTINATION"


def step(view):
    """The step a job has reached; an ended job that failed keeps the step it got to."""
    if view["status"] in STEP:
        return STEP[view["status"]]
    return sum(1 for field in ("time_staging", "time_staged", "time_transferring") if view.get(field))


def short_time(text):
    """An API time without its fraction of a second: 2026-12-02T10:00:01Z."""
    if not text:
        return ""
    return text.split(".")[0].rstrip("Z") + "Z"


def parse_time(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def until(text, now=None):
    """An ETA in words: "14:56:09Z, in 3 min" ("" when unknown)."""
    if not text:
        return ""
    try:
        when = parse_time(text)
    except ValueError:
        return text
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{when.strftime('%H:%M:%SZ')}, in {duration((when - now).total_seconds())}"


def duration(seconds):
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def what_now(view):
    """One phrase saying where the job stands: what it waits for, or how it ended."""
    waiting = view.get("waiting_for")
    if waiting:
        return waiting.get("message") or waiting.get("reason") or ""
    return view.get("detailed_status") or ""


def status_block(view):
    """`transferctl status`: the job's id and state, then one labelled line per known fact."""
    rows = [
        ("product", view.get("product_id")),
        ("destination", view.get("destination_path")),
        ("submitter", view.get("submitter")),
        ("priority", view.get("priority")),
        ("label", view.get("label")),
        ("metadata", view.get("metadata")),
        ("submitted", short_time(view.get("time_submitted"))),
        ("updated", short_time(view.get("time_updated"))),
        ("detail", view.get("detailed_status")),
        ("waiting for", (view.get("waiting_for") or {}).get("message")),
        ("eta", until(view.get("eta"))),
        ("stage attempts", view.get("stage_attempts")),
        ("fts job", view.get("fts_jobid")),
    ]
    lines = [f"{view['job_id']}  {view['status']}"]
    lines += [f"  {label:15} {_text(value)}" for label, value in rows if value not in (None, "", {})]
    return "\n".join(lines)


def list_row(view):
    return (f"{view['job_id']:36}  {view['status']:12}  {short_time(view.get('time_submitted')):20}  "
            f"{view.get('product_id', ''):16}  {view.get('destination_path', '')}")


def history_row(event):
    change = event.get("kind") or ""
    if event.get("new_status"):
        change = f"{event['old_status']} -> {event['new_status']}" if event.get("old_status") else event["new_status"]
    return "  ".join(part for part in (short_time(event.get("time")), f"{change:26}", event.get("actor") or "-",
                                       event.get("reason") or "") if part is not None).rstrip()


def change_line(view):
    """`watch` without a terminal: one line each time a job changes."""
    parts = [short_time(view.get("time_updated")) or "-", view["job_id"], view["status"], view.get("product_id", "")]
    now = what_now(view)
    if now:
        parts.append(now)
    if view.get("eta") and view["status"] not in TERMINAL:
        parts.append("eta " + short_time(view["eta"]))
    return "  ".join(parts)


def overall_eta(views):
    """The latest ETA of the jobs still active, when every one of them has one (None otherwise)."""
    active = [view for view in views if view["status"] not in TERMINAL]
    if not active or not all(view.get("eta") for view in active):
        return None
    return max((view["eta"] for view in active), key=parse_time)


def counts(views):
    """ "4 SUCCESS, 1 ERROR": how many jobs are in each state, in the order of the states."""
    found = {}
    for view in views:
        found[view["status"]] = found.get(view["status"], 0) + 1
    order = list(STEP) + ["ERROR", "CANCELLED"]
    return ", ".join(f"{found[state]} {state}"
                     for state in sorted(found, key=lambda s: order.index(s) if s in order else len(order)))


def tally(views):
    """ "5 jobs: 4 SUCCESS, 1 ERROR" """
    return f"{len(views)} job{'s' if len(views) != 1 else ''}: {counts(views)}"


DAEMONS_HEADER = (f"{'HOST':24}  {'PID':>7}  {'VERSION':8}  {'STATE':8}  {'HELD':>5}  {'POLLS':14}  "
                  f"{'LAST BEAT':20}  DAEMON")


def poll_share(share):
    """ "1/3 0-340": its rank of the live daemons and the poll slots it polls (last inclusive); "-" for none."""
    if not share:
        return "-"
    first, end = share["slots"]
    return f"{share['rank']}/{share['of']} {first}-{end - 1}"


def daemon_row(daemon):
    """`admin status`: one daemon a line; * marks the one that answered."""
    return (f"{daemon['host']:24}  {daemon['pid']:>7}  {daemon.get('version') or '-':8}  {daemon['state']:8}  "
            f"{daemon['jobs_held']:>5}  {poll_share(daemon.get('poll_share')):14}  "
            f"{short_time(daemon.get('time_beat')):20}  {daemon['daemon_id']}{' *' if daemon.get('this') else ''}")


def job_counts(counts):
    """ "3 SUBMITTED, 1 STAGING, ...": every state, in the order of the states."""
    order = list(STEP) + ["ERROR", "CANCELLED"]
    return ", ".join(f"{counts.get(state, 0)} {state}" for state in order)


def _text(value):
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)
