"""The dashboard's HTML: one function per view, from the v1 API's views and the store's counts.

Every value goes through escape(); the layout is templates/page.html.
Parts of a page that change while jobs move carry data-live and an id:
static/dashboard.js replaces them with those of the page fetched again.
"""

import html
import json
import os
import re
import string
from datetime import datetime, timezone
from http import HTTPStatus
from urllib.parse import urlencode

from transferd import jobs

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "page.html")
with open(TEMPLATE, encoding="utf-8") as _handle:
    LAYOUT = string.Template(_handle.read())

NAV = (("overview", "/", "Overview"), ("jobs", "/jobs", "Jobs"), ("errors", "/errors", "Errors"))
WAITING = (jobs.SUBMITTED, jobs.STAGING, jobs.STAGED)  # "waiting" in the per-host tables; TRANSFERRING is "active"
WINDOW_NAMES = {"1h": "last hour", "1d": "last day", "7d": "last 7 days", "30d": "last 30 days", "all": "any time"}

# What varies between messages of one kind of failure: URLs, ids, paths, quoted names, numbers.
_VARIABLE = re.compile(
    r"(?P<url>\b[a-z][a-z0-9+.-]*://\S+)"
    r"|(?P<id>\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b)"
    r"|(?P<path>(?<![\w.])/[^\s'\",;()]+)"
    r"|(?P<quoted>'[^']*'|\"[^\"]*\")"
    r"|(?P<number>\b\d+(?:\.\d+)?\b)",
    re.IGNORECASE,
)
_PLACEHOLDERS = {"url": "<url>", "id": "<id>", "path": "<path>", "quoted": "'…'", "number": "<n>"}
MAX_CLASS = 200


def escape(value):
    return html.escape("" if value is None else str(value), quote=True)


def iso(moment):
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def phrase(status):
    return HTTPStatus(status).phrase


def reason_class(text):
    """The kind of failure a detailed_status tells, its variable parts (URLs, ids, paths, numbers) replaced."""
    if not text:
        return "(no reason recorded)"
    shown = _VARIABLE.sub(lambda match: _PLACEHOLDERS[match.lastgroup], text)
    shown = " ".join(shown.split())
    return shown if len(shown) <= MAX_CLASS else shown[:MAX_CLASS - 1] + "…"


def group_reasons(reasons):
    """[(class, count, latest, example message)] from the store's (detailed_status, count, latest), by count."""
    groups = {}
    for reason, count, latest in reasons:
        key = reason_class(reason)
        total, newest, example = groups.get(key, (0, None, reason))
        groups[key] = (total + count, max(filter(None, (newest, latest)), default=None), example)
    ranked = sorted(groups.items(), key=lambda item: (-item[1][0], item[0]))
    return [(key, count, latest, example) for key, (count, latest, example) in ranked]


# -- small pieces ---------------------------------------------------------------------------------


def when(text):
    """A <time> for an ISO time (a v1 view's) or a datetime; a dash for none."""
    if text is None:
        return '<span class="none">—</span>'
    if isinstance(text, datetime):
        text = iso(text)
    shown = text.replace("T", " ")
    shown = re.sub(r"\.\d+", "", shown)
    return f'<time datetime="{escape(text)}">{escape(shown)}</time>'


def badge(status):
    return f'<span class="badge badge-{escape(status.lower())}">{escape(status)}</span>'


def link(path, params=None):
    query = urlencode({k: v for k, v in (params or {}).items() if v not in (None, "")})
    return escape(path + ("?" + query if query else ""))


def cancel_button(job_id, status):
    """A cancel button (shown by the script, which asks for confirmation) for a job still active."""
    if status in jobs.TERMINAL:
        return ""
    return (f'<button type="button" class="cancel" id="cancel-{escape(job_id)}" data-cancel="{escape(job_id)}"'
            f' aria-label="Cancel job {escape(job_id)}" hidden>Cancel</button>')


def table(caption, headers, rows, table_id=None, empty="None."):
    """A table in a scrolling box (narrow screens); rows are lists of HTML cells already escaped."""
    if not rows:
        return f'<p class="empty"{_id(table_id)}>{escape(caption)}: {escape(empty)}</p>'
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(cell if cell.startswith(("<td", "<th")) else f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return (f'<div class="scroll"{_id(table_id)} tabindex="0" role="region" aria-label="{escape(caption)}">'
            f"<table><caption>{escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _id(value):
    return f' id="{escape(value)}" data-live' if value else ""


def dl(pairs):
    """A definition list of (term, HTML value) pairs, leaving out those without a value."""
    items = "".join(f"<dt>{escape(term)}</dt><dd>{value}</dd>" for term, value in pairs if value not in (None, ""))
    return f'<dl class="facts">{items}</dl>'


def page(view, title, body, who, version, poll=None, since=None):
    nav = "".join(f'<li><a href="{href}"{" aria-current=page" if name == view else ""}>{label}</a></li>'
                  for name, href, label in NAV)
    live = f' data-poll="{poll}" data-since="{escape(since)}"' if poll else ""
    return LAYOUT.substitute(title=escape(title), nav=nav, who=escape(who), body=body, view=escape(view),
                             live=live, version=escape(version))


# -- the views ------------------------------------------------------------------------------------


def overview(states, last_hour, last_day, hosts, stagers):
    cards = "".join(
        f'<li class="card"><a href="{link("/jobs", {"status": state})}"><span class="count">{states.get(state, 0)}</span>'
        f' {badge(state)}</a></li>' for state in jobs.STATES)
    ended = (jobs.SUCCESS, jobs.ERROR, jobs.CANCELLED)
    activity = table("Submitted and finished", ["", "Submitted", "Succeeded", "Failed", "Cancelled", "Throughput"], [
        [f'<th scope="row">{label}</th>', str(counts["submitted"]), *(str(counts[s]) for s in ended),
         f"{counts[jobs.SUCCESS] / hours:.1f} jobs/h"]
        for label, counts, hours in (("Last hour", last_hour, 1), ("Last day", last_day, 24))
    ], "activity")
    return (f'<section aria-labelledby="states-h"><h2 id="states-h">Jobs by state now</h2>'
            f'<ul class="cards" id="states" data-live>{cards}</ul></section>'
            f'<section aria-labelledby="activity-h"><h2 id="activity-h">Activity</h2>{activity}'
            '<p class="hint">Throughput: jobs that succeeded per hour, over the last hour and the last day.</p></section>'
            f'<section aria-labelledby="hosts-h"><h2 id="hosts-h">By destination host</h2>'
            f'{breakdown("Destination hosts", hosts, "destination_host", "(local files)")}</section>'
            f'<section aria-labelledby="stagers-h"><h2 id="stagers-h">By stager</h2>'
            f'{breakdown("Stagers", stagers, None, "(not staged yet)")}</section>')


def breakdown(caption, counts, filter_name, unnamed):
    """Waiting, active, succeeded and failed (last day) and the success rate per host, busiest first."""
    rows = []
    for key, by_status in sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0] or "")):
        waiting = sum(by_status.get(s, 0) for s in WAITING)
        active, succeeded, failed = (by_status.get(s, 0) for s in (jobs.TRANSFERRING, jobs.SUCCESS, jobs.ERROR))
        rate = f"{100 * succeeded / (succeeded + failed):.0f} %" if succeeded + failed else "—"
        name = escape(key) if key else f'<span class="none">{escape(unnamed)}</span>'
        if key and filter_name:
            name = f'<a href="{link("/jobs", {filter_name: key})}">{name}</a>'
        rows.append([f'<th scope="row">{name}</th>', str(waiting), str(active), str(succeeded), str(failed), rate])
    return table(caption, ["Host", "Waiting", "Active", "Succeeded (day)", "Failed (day)", "Success rate"], rows,
                 caption.lower().replace(" ", "-"), empty="no jobs")


def job_list(page, shown, admin, windows):
    """admin: the caller sees others' jobs (a Submitter filter and column; not without authentication)."""
    options = "".join(f'<option value="{s}"{" selected" if shown.get("status") == s else ""}>{s}</option>'
                      for s in jobs.STATES)
    status_known = shown.get("status") in (None, *jobs.STATES)
    if not status_known:  # several states, as the API takes them ("STAGING,STAGED")
        options += f'<option value="{escape(shown["status"])}" selected>{escape(shown["status"])}</option>'
    fields = [f'<div class="field"><label for="f-status">State</label><select id="f-status" name="status">'
              f'<option value="">any</option>{options}</select></div>']
    for name, label in (("product_id", "Product"), ("label", "Label"), ("destination_host", "Destination host"),
                        *((("submitter", "Submitter"),) if admin else ())):
        fields.append(f'<div class="field"><label for="f-{name}">{label}</label><input id="f-{name}" name="{name}"'
                      f' value="{escape(shown.get(name, ""))}" autocomplete="off"></div>')
    window_options = "".join(f'<option value="{w}"{" selected" if shown["window"] == w else ""}>'
                             f'{WINDOW_NAMES[w]}</option>' for w in (*windows, "all"))
    fields.append(f'<div class="field"><label for="f-window">Submitted</label><select id="f-window" name="window">'
                  f"{window_options}</select></div>")
    form = (f'<form class="filters" method="get" action="/jobs" role="search" aria-label="Filter jobs">'
            f'{"".join(fields)}<div class="actions"><button type="submit">Filter</button>'
            f' <a href="/jobs">Clear</a></div></form>')
    headers = ["Job", "State", "Product", "Destination", *(["Submitter"] if admin else []), "Submitted",
               "Updated", "Actions"]
    rows = []
    for view in page["jobs"]:
        job_id = view["job_id"]
        rows.append([
            f'<td><a class="job" href="/jobs/{escape(job_id)}" aria-label="Job {escape(job_id)}">'
            f'<code>{escape(job_id[:8])}</code></a></td>',
            f'<td data-status="{escape(view["status"])}">{badge(view["status"])}</td>',
            escape(view.get("product_id")),
            f'<td class="path">{escape(view.get("destination_path"))}</td>',
            *([escape(view.get("submitter") or "—")] if admin else []),
            when(view.get("time_submitted")), when(view.get("time_updated")),
            cancel_button(job_id, view["status"]),
        ])
    listing = table("Jobs, newest first", headers, rows, "job-table", empty="no job matches these filters")
    pager = [f'<a href="{link("/jobs", {k: v for k, v in shown.items() if k != "cursor"})}">Newest</a>']
    if page["next"]:
        pager.append(f'<a rel="next" href="{link("/jobs", dict(shown, cursor=page["next"]))}">Older jobs →</a>')
    return f'{form}{listing}<nav class="pager" aria-label="Pages">{" ".join(pager)}</nav>'


def job_detail(view):
    job_id = view["job_id"]
    waiting = view.get("waiting_for")
    summary = dl([
        ("State", badge(view["status"])),
        ("Why", escape(view.get("detailed_status"))),
        ("Waiting for", escape(waiting["message"]) if waiting else None),
        ("Expected to end", when(view.get("eta")) if view.get("eta") else None),
        ("Product", escape(view.get("product_id"))),
        ("Destination", f'<span class="path">{escape(view.get("destination_path"))}</span>'),
        ("Submitter", escape(view.get("submitter"))),
        ("Priority", escape(view.get("priority"))),
        ("Label", escape(view.get("label"))),
        ("Submitted", when(view.get("time_submitted"))),
        ("Last change", when(view.get("time_updated"))),
    ])
    steps = []
    for event in view.get("history", []):
        if event["kind"] == "state":
            what = (f'{badge(event["old_status"])} → {badge(event["new_status"])}' if event["old_status"]
                    else badge(event["new_status"]))
        else:
            what = f'attempt in {badge(event["new_status"] or event["old_status"] or "")}'
        reason = f'<p class="reason">{escape(event["reason"])}</p>' if event.get("reason") else ""
        steps.append(f'<li class="step step-{escape(event["kind"])}">{when(event["time"])} {what}'
                     f' <span class="actor">by {escape(event.get("actor") or "transferd")}</span>{reason}</li>')
    timeline = f'<ol class="timeline" id="timeline" data-live>{"".join(steps)}</ol>'
    files = table("Staged files", ["Path", "Size (bytes)", "Checksum"],
                  [[escape(f.get("path")), escape(f.get("size", "—")), f'<code>{escape(f.get("checksum", "—"))}</code>']
                   for f in view.get("staged_files") or []], "files", empty="none recorded yet")
    stager = dl([("Request", f'<code>{escape(view.get("stager_request"))}</code>' if view.get("stager_request")
                  else None),
                 ("Staged to host", escape(view.get("stager_hostname"))),
                 ("Staged copy", f'<span class="path">{escape(view.get("stager_path"))}</span>'
                  if view.get("stager_path") else None),
                 ("Stager says", escape(view.get("stager_status"))),
                 ("Attempts", escape(view.get("stage_attempts")))])
    transfer = dl([("FTS job", f'<code>{escape(view.get("fts_jobid"))}</code>' if view.get("fts_jobid") else None)])
    transfer += fts_details(view.get("fts_details"))
    if not view.get("fts_jobid") and not view.get("fts_details"):
        transfer = '<p class="none">No FTS job recorded (not started yet, or delivered by the local mover).</p>'
    metadata = (f'<h2>Metadata</h2><pre>{escape(json.dumps(view["metadata"], indent=2, ensure_ascii=False))}</pre>'
                if view.get("metadata") is not None else "")
    return (f'<div class="job-head" id="job-head" data-live><p>{badge(view["status"])}'
            f' {cancel_button(job_id, view["status"])}</p>{summary}</div>'
            f'<section aria-labelledby="timeline-h"><h2 id="timeline-h">History</h2>{timeline}</section>'
            f'<section aria-labelledby="files-h"><h2 id="files-h">Files</h2>{files}</section>'
            f'<section aria-labelledby="stager-h" id="stager" data-live><h2 id="stager-h">Staging request</h2>'
            f'{stager}</section>'
            f'<section aria-labelledby="transfer-h" id="transfer" data-live><h2 id="transfer-h">Transfer</h2>'
            f'{transfer}</section>{metadata}')


def fts_details(text):
    """FTS's job report (JSON: job_state, files), or the mover's own words."""
    if not text:
        return ""
    try:
        details = json.loads(text)
    except ValueError:
        return f"<pre>{escape(text)}</pre>"
    if not isinstance(details, dict):
        return f"<pre>{escape(text)}</pre>"
    files = [f for f in details.get("files") or [] if isinstance(f, dict)]
    rows = [[escape(f.get("file_state")), f'<td class="path">{escape(f.get("dest_surl"))}</td>',
             escape(f.get("reason") or "")] for f in files]
    return (dl([("FTS state", escape(details.get("job_state")))])
            + table("FTS files", ["State", "Destination", "Reason"], rows, None, empty="none reported"))


def errors(groups, window, windows, chosen, failed):
    picks = " ".join(f'<a href="{link("/errors", {"window": w})}"{" aria-current=true" if w == window else ""}>'
                     f"{WINDOW_NAMES[w]}</a>" for w in windows)
    rows = []
    for key, count, latest, example in groups:
        rows.append([f'<th scope="row"><a href="{link("/errors", {"window": window, "reason": key})}#failed">'
                     f"{escape(key)}</a></th>", str(count), when(latest), f'<td class="example">{escape(example)}</td>'])
    ranked = table(f"Failed jobs by reason, {WINDOW_NAMES[window]}", ["Reason", "Jobs", "Latest", "For example"], rows,
                   "reasons", empty="no job failed")
    chosen_part = ""
    if chosen is not None:
        listed = [[f'<td><a class="job" href="/jobs/{escape(job.job_id)}" aria-label="Job {escape(job.job_id)}">'
                   f"<code>{escape(job.job_id[:8])}</code></a></td>", escape(job.product_id),
                   escape(job.destination_host or "—"), when(job.time_updated),
                   f'<td class="example">{escape(job.detailed_status)}</td>'] for job in failed]
        chosen_part = (f'<section aria-labelledby="failed-h" id="failed"><h2 id="failed-h">Jobs that failed so:'
                       f' {escape(chosen)}</h2>'
                       + table("Failed jobs, latest first", ["Job", "Product", "Destination host", "Failed", "Reason"],
                               listed, "failed-jobs", empty="none among the latest failures")
                       + "</section>")
    return (f'<nav class="windows" aria-label="Time window">{picks}</nav>'
            f"<section>{ranked}</section>{chosen_part}")


def refusal(status, detail):
    return f'<p class="refusal">{escape(status)} {escape(phrase(status))}: {escape(detail)}</p><p><a href="/">Overview</a></p>'
