// transferd's dashboard: keeps the page current and cancels jobs, through /api/v1 (docs/dashboard.md).
// Every POLL seconds (main's data-poll) it asks GET /api/v1/jobs whether a job the caller sees changed after
// the page was read (data-since); if one did, or a minute has passed, it fetches the page again and swaps in
// its parts marked data-live.  Cancel buttons ask for confirmation, then call DELETE /api/v1/jobs/{id}.
(function () {
  "use strict";
  var main = document.querySelector("main");
  var notice = document.getElementById("notice");
  var lastRefresh = Date.now();
  var FULL_REFRESH_MS = 60000;

  function showButtons() {
    document.querySelectorAll("button[data-cancel]").forEach(function (button) { button.hidden = false; });
  }

  function say(text) { if (notice) { notice.textContent = text; } }

  function changed() {
    var since = main.getAttribute("data-since");
    return fetch("/api/v1/jobs?limit=1&updated_after=" + encodeURIComponent(since),
                 {headers: {Accept: "application/json"}, credentials: "same-origin"})
      .then(function (response) { return response.ok ? response.json() : {jobs: []}; })
      .then(function (body) { return body.jobs.length > 0; });
  }

  function refresh() {
    return fetch(location.href, {headers: {Accept: "text/html"}, credentials: "same-origin"})
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html");
        var focused = document.activeElement && document.activeElement.id;
        fresh.querySelectorAll("[data-live]").forEach(function (part) {
          var old = document.getElementById(part.id);
          if (old) { old.replaceWith(document.importNode(part, true)); }
        });
        var freshMain = fresh.querySelector("main");
        if (freshMain && freshMain.hasAttribute("data-since")) {
          main.setAttribute("data-since", freshMain.getAttribute("data-since"));
        } else {
          main.removeAttribute("data-poll");  // the job has ended: nothing more will change
        }
        showButtons();
        if (focused && document.getElementById(focused)) { document.getElementById(focused).focus(); }
        lastRefresh = Date.now();
      });
  }

  function poll() {
    var seconds = Number(main.getAttribute("data-poll"));
    if (!seconds) { return; }
    setTimeout(function () {
      var step = document.hidden ? Promise.resolve() : changed().then(function (yes) {
        if (yes || Date.now() - lastRefresh > FULL_REFRESH_MS) { return refresh(); }
      });
      step.catch(function () { /* the daemon is away: try again next time */ }).then(poll);
    }, seconds * 1000);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-cancel]");
    if (!button) { return; }
    var jobId = button.getAttribute("data-cancel");
    if (!window.confirm("Cancel job " + jobId + "? Its staging or transfer stops and cannot be resumed.")) { return; }
    button.disabled = true;
    fetch("/api/v1/jobs/" + encodeURIComponent(jobId),
          {method: "DELETE", headers: {Accept: "application/json"}, credentials: "same-origin"})
      .then(function (response) {
        return response.json().then(function (body) {
          say(response.ok ? "Job " + jobId + " cancelled." : "Job " + jobId + " was not cancelled: " + body.detail);
        });
      })
      .catch(function () { say("Job " + jobId + " was not cancelled: transferd did not answer."); })
      .then(refresh)
      .finally(function () { button.disabled = false; });
  });

  showButtons();
  if (main && main.hasAttribute("data-poll")) { poll(); }
}());
