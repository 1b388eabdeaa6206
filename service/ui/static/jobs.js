// Jobs page: active rows poll their JSON twin every second for progress, rate and ETA.
"use strict";
(function () {
  async function poll(row) {
    const r = await fetch("/ui/jobs/" + row.dataset.job + "/status.json", {credentials: "same-origin"});
    if (!r.ok) return;
    const j = await r.json();
    row.dataset.status = j.status;
    row.querySelector(".status").textContent = j.status;
    const bar = row.querySelector("progress");
    bar.max = j.total || 1; bar.value = j.processed;
    row.querySelector(".count").textContent = j.processed + " / " + (j.total == null ? "?" : j.total);
    row.querySelector(".rate").textContent = j.rate_per_s ? j.rate_per_s.toFixed(1) + "/s" : "";
    row.querySelector(".eta").textContent = j.eta_s != null ? Math.round(j.eta_s) + " s" : "";
    if (j.status !== "queued" && j.status !== "running") {
      row.lastElementChild.innerHTML = '<a href="/ui/jobs/' + j.id + '/review">Review</a>';
      return;
    }
    setTimeout(() => poll(row), 1000);
  }
  document.querySelectorAll("tr[data-status=queued], tr[data-status=running]").forEach(poll);
})();
