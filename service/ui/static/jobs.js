// Jobs page: active rows poll their JSON twin every second for progress, rate, ETA and notes.
"use strict";
(function () {
  function link(href, text) {
    const a = document.createElement("a");
    a.href = href; a.textContent = text;
    return a;
  }

  // the Retry the page renders for a retryable job (jobs.html's retry-template, its titles
  // on the template: the script wrote the form's markup and words again)
  function retryForm(j) {
    const template = document.getElementById("retry-template");
    const form = template.content.firstElementChild.cloneNode(true);
    form.action = BASE + "/ui/jobs/" + j.id + "/retry";
    form.querySelector("button").title = j.status === "done"  // on the button: a form's title is never read out
      ? template.dataset.readAgain : (j.error || "cancelled") + template.dataset.runAgain;
    return form;
  }

  // the Delete the page renders for a finished job (jobs.html's delete-template): a job that
  // ended while the page was open had Review and Retry but no Delete until a reload
  function deleteForm(j) {
    const details = document.getElementById("delete-template").content.firstElementChild.cloneNode(true);
    details.querySelector("form").action = BASE + "/ui/jobs/" + j.id + "/delete";
    details.querySelector("button").textContent = "Delete job " + j.id;
    return details;
  }

  // one failed check (the store busy a moment, the link away) stopped the row for good, and a
  // signed-out page went on showing "running" (an audit): checks go on, and a lost session says so
  async function poll(row) {
    const status = row.querySelector(".status");  // a live region: written only when it changes
    let r = null;
    try { r = await fetch(BASE + "/ui/jobs/" + row.dataset.job + "/status.json", {credentials: "same-origin"}); }
    catch (e) { r = null; }
    if (r && r.status === 401) { status.textContent = "not followed: sign in again to see it"; return; }
    if (r && r.status === 404) { status.textContent = "deleted"; return; }
    if (!r || !r.ok) { setTimeout(() => poll(row), 3000); return; }
    const j = await r.json();
    row.dataset.status = j.status;
    const said = j.status + (j.waiting ? ": waiting, " + j.waiting : j.step ? ": " + j.step : "");
    if (status.textContent !== said) status.textContent = said;
    const bar = row.querySelector("progress");
    bar.max = j.total || 1; bar.value = j.processed;
    row.querySelector(".count").textContent = j.processed + " / " + (j.total == null ? "?" : j.total);
    row.querySelector(".rate").textContent = j.rate_per_s ? j.rate_per_s.toFixed(1) + "/s" : "";
    row.querySelector(".eta").textContent = j.eta_s != null ? Math.round(j.eta_s) + " s" : "";
    // a running job's notes too (`run_notes`): many photos called no_cervix early in a long job
    // is a reason to stop it and look, not to wait for the end
    const notes = row.querySelector(".notes");
    if (notes.textContent !== j.notes.join("")) {
      notes.replaceChildren(...j.notes.map((text) => {
        const p = document.createElement("p");
        p.className = "hint note"; p.textContent = text;
        return p;
      }));
    }
    if (j.status !== "queued" && j.status !== "running") {
      const cell = row.lastElementChild;
      const focused = cell.contains(document.activeElement);  // the Cancel button goes: focus must not
      const review = link(BASE + "/ui/jobs/" + j.id + "/review", "Review");
      cell.replaceChildren(review, " ", deleteForm(j));
      if (j.retryable) cell.append(" ", retryForm(j));
      if (focused) review.focus();
      return;
    }
    setTimeout(() => poll(row), 1000);
  }
  document.querySelectorAll("tr[data-status=queued], tr[data-status=running]").forEach(poll);
})();
