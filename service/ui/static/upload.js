// Upload page: each photo is sent to /ui/upload (the same handler as /v1/qc) and gets a card
// drawn from the browser's own copy of the file, so the server keeps no image.
"use strict";
(function () {
  const input = document.getElementById("files"), zone = document.getElementById("drop-zone");
  const cards = document.getElementById("cards"), status = document.getElementById("status");
  const tpl = document.getElementById("card-template");
  // photos in flight at once (the page's `parallel`): a whole drop sent at once overran the
  // engine's queue, and the photos past it came back "not checked" (503)
  const PARALLEL = Math.max(1, parseInt(document.getElementById("upload").dataset.parallel, 10) || 1);
  const T = JSON.parse(document.getElementById("thresholds").textContent);
  const vs = (name, score, thr) => name + " " + score.toFixed(3) + (thr != null ? " vs " + thr.toFixed(3) : "");

  function card(file) {
    const li = tpl.content.firstElementChild.cloneNode(true);
    li.querySelector("img").src = URL.createObjectURL(file);
    li.querySelector("img").alt = file.name;
    li.querySelector(".path").textContent = file.name;
    li.querySelector(".label").textContent = "checking…";
    cards.prepend(li);
    return li;
  }

  function fill(li, r) {
    const cls = r.label === "non_regular" && (r.kind === "green" || r.kind === "iodine") ? r.kind : r.label;
    const label = li.querySelector(".label");
    label.textContent = WORDS[cls] || r.label;
    label.className = "label label-" + cls;
    li.dataset.label = r.label;
    // each score against the threshold it was compared to (policy: which of them decide)
    const scores = [];
    if (r.resnest_prob != null) scores.push(vs("ResNeSt", r.resnest_prob, T.resnest));
    if (r.deep_sad_score != null) scores.push(vs("Deep SAD", r.deep_sad_score, T.deep_sad));
    if (r.colour_score != null && T.colour != null) scores.push(vs("crop colour", r.colour_score, T.colour));
    if (r.label === "no_cervix" && r.presence_score != null) scores.push(vs("cervix presence", r.presence_score, T.presence));
    else if (r.label === "no_cervix" && r.cervix_score != null) scores.push(vs("detector", r.cervix_score, T.detector));
    li.querySelector(".score").textContent = scores.join(" · ") + (scores.length && r.label !== "no_cervix" ? " (policy " + T.policy + ")" : "");
    if (r.error) li.querySelector(".reason").textContent = "Reason: " + r.error;
    const flags = Object.entries(r.findings || {}).filter(([, f]) => f.flagged)
      .map(([n, f]) => n + " " + f.score.toFixed(2) + " > " + f.threshold.toFixed(2));
    if (flags.length) li.querySelector(".flags").textContent = "Findings: " + flags.join(", ");
    const pic = li.querySelector(".pic");
    if (r.width) pic.style.aspectRatio = r.width + " / " + r.height;
    placeBox(li.querySelector(".box"), r.cervix_box, r.width, r.height);
  }

  async function send(file) {
    const li = card(file), form = new FormData();
    form.append("files", file, file.name);
    try {
      const resp = await fetch(BASE + "/ui/upload", {method: "POST", body: form, headers: {"X-CSRF-Token": csrf()},
                                                     credentials: "same-origin"});
      // a proxy's own refusal (nginx's 413 past client_max_body_size, its 502 or 504) is HTML
      const data = await resp.json().catch(() => ({error: {message: "HTTP " + resp.status + " " + resp.statusText}}));
      const results = data.results || (data.error && data.error.results);
      if (results && results.length) { fill(li, results[0]); return results[0].label; }
      li.querySelector(".label").textContent = "not checked";
      li.querySelector(".reason").textContent = "Reason: " + ((data.error && data.error.message) || resp.statusText);
    } catch (e) {
      li.querySelector(".label").textContent = "not checked";
      li.querySelector(".reason").textContent = "Reason: " + e.message;
    }
    return null;
  }

  // the status line (read out: role=status) says what came back, not only that it ended:
  // "3 photo(s) checked." read the same when a request had failed
  const SHORT = {regular: "regular", non_regular: "non-regular", no_cervix: "no cervix", unreadable: "unreadable"};
  async function sendAll(files) {
    const list = Array.from(files);
    status.textContent = "Checking " + list.length + " photo(s)…";
    const labels = new Array(list.length);
    let next = 0;
    async function worker() {
      while (next < list.length) { const i = next++; labels[i] = await send(list[i]); }
    }
    await Promise.all(Array.from({length: Math.min(PARALLEL, list.length)}, worker));
    const counts = new Map();
    labels.filter(l => l !== null).forEach(l => counts.set(l, (counts.get(l) || 0) + 1));
    const failed = labels.filter(l => l === null).length, parts = [];
    counts.forEach((n, l) => parts.push(n + " " + (SHORT[l] || l)));
    status.textContent = (list.length - failed) + " of " + list.length + " photo(s) checked" +
      (parts.length ? ": " + parts.join(", ") : "") + (failed ? "; " + failed + " not checked (see the cards)" : "") + ".";
  }

  input.addEventListener("change", () => { if (input.files.length) sendAll(input.files); });
  ["dragenter", "dragover"].forEach(ev => zone.addEventListener(ev, e => { e.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach(ev => zone.addEventListener(ev, e => { e.preventDefault(); zone.classList.remove("over"); }));
  zone.addEventListener("drop", e => { if (e.dataTransfer.files.length) sendAll(e.dataTransfer.files); });
  if (input.files.length) sendAll(input.files);  // files picked while the page was still loading
})();
