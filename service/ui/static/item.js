// One image: keys 1-5 set the label, Enter confirms the model's, u undoes, arrows walk the
// grid's order; dragging on the photo draws a corrected box. Every decision goes to the server
// at once (who, when, old -> new live in SQLite), then the page reloads to show the history.
"use strict";
(function () {
  const root = document.getElementById("item");
  const base = BASE + "/ui/jobs/" + root.dataset.job + "/items/" + root.dataset.item;
  const W = +root.dataset.width, H = +root.dataset.height;
  const stage = document.getElementById("stage"), box = document.getElementById("box");
  const saved = document.getElementById("saved");
  const model = JSON.parse(document.getElementById("model").textContent);
  const CLASSES = ["regular", "green", "iodine", "no_cervix", "unreadable"];
  // the item's review as this page shows it: a change by another reviewer since is refused (409)
  const seen = +root.dataset.seen;
  // and the job's result for it: a retry that read the photo again changes that, not the review
  const shown = root.dataset.shown;

  // the page reloads to show the history: the message waits in sessionStorage and is shown (and
  // read out) after it, with focus on the decision buttons; before, it vanished with the reload
  const SAVED = "cervixqc-saved";
  // one decision in flight at a time: a second key pressed before the first's answer was sent
  // with the page's old version, refused (409), and its "Not saved" wiped by the first's reload,
  // so the page said the first was saved and nothing said the second was not (an audit)
  let sending = false;
  async function send(url, body, what) {
    if (sending) { saved.textContent = "Still saving the last decision: press again once it shows."; return; }
    sending = true;
    try {
      await postJSON(url, body);
      sessionStorage.setItem(SAVED, "Saved: " + what);
      location.reload();
    } catch (e) {
      sending = false;
      placeBox(box, model.box, W, H);  // a refused box is not left drawn as if it were the photo's
      saved.textContent = "Not saved: " + e.message;
    }
  }
  const pending = sessionStorage.getItem(SAVED);
  if (pending) {
    sessionStorage.removeItem(SAVED);
    document.getElementById("decide").focus();
    setTimeout(() => { saved.textContent = pending; }, 100);  // after load: a live region's change is read
  }
  // single-key shortcuts can be switched off (WCAG 2.1.4): screen readers and speech input use those keys
  const shortcuts = document.getElementById("shortcuts");
  shortcuts.checked = localStorage.getItem("cervixqc-shortcuts") !== "off";
  shortcuts.addEventListener("change", () => localStorage.setItem("cervixqc-shortcuts", shortcuts.checked ? "on" : "off"));
  const label = cls => send(base + "/decision", {label: cls, seen, shown}, WORDS[cls]);
  document.querySelectorAll(".keys button[data-label]").forEach(b => b.addEventListener("click", () => label(b.dataset.label)));
  document.getElementById("undo").addEventListener("click", () => send(base + "/undo", {seen, shown}, "undo"));

  // the box with the keyboard alone: b starts editing (the current box, or a centred one),
  // arrows move it by 1% of the photo, Shift+arrows grow or shrink it, Enter saves, Esc cancels
  let editing = null;
  function keyboardBox(e) {
    const dx = W / 100, dy = H / 100, b = editing;
    const moves = {ArrowLeft: [-dx, 0], ArrowRight: [dx, 0], ArrowUp: [0, -dy], ArrowDown: [0, dy]};
    if (e.key === "Escape") { editing = null; location.reload(); return; }
    if (e.key === "Enter") { const done = editing; editing = null;
      send(base + "/decision", {box: done, seen, shown}, "box"); return; }  // the server rounds to 0.1 px
    const m = moves[e.key];
    if (!m) return;
    if (e.shiftKey) { b[2] = Math.min(W, Math.max(b[0] + dx, b[2] + m[0])); b[3] = Math.min(H, Math.max(b[1] + dy, b[3] + m[1])); }
    else {
      const sx = Math.min(Math.max(m[0], -b[0]), W - b[2]), sy = Math.min(Math.max(m[1], -b[1]), H - b[3]);
      b[0] += sx; b[2] += sx; b[1] += sy; b[3] += sy;
    }
    placeBox(box, b, W, H);
    saved.textContent = "Editing the box: arrows move, Shift+arrows resize, Enter saves, Esc cancels.";
  }

  function editBox() {
    editing = model.box ? model.box.slice() : [W / 4, H / 4, 3 * W / 4, 3 * H / 4];
    placeBox(box, editing, W, H);
    saved.textContent = "Editing the box: arrows move, Shift+arrows resize, Enter saves, Esc cancels.";
  }
  const editButton = document.getElementById("edit-box");
  if (editButton) editButton.addEventListener("click", e => { e.stopPropagation(); editBox(); });

  document.addEventListener("keydown", e => {
    if (e.target.closest("input, select, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
    if (editing) {  // Tab still leaves: no keyboard trap
      if (e.key === "Tab") { editing = null; location.reload(); return; }
      e.preventDefault(); keyboardBox(e); return;
    }
    if (!shortcuts.checked) return;
    if (e.key === "b" && W && H) { e.preventDefault(); editBox(); return; }
    const n = parseInt(e.key, 10);
    if (n >= 1 && n <= 5) { e.preventDefault(); label(CLASSES[n - 1]); }
    else if (e.key === "Enter" && !e.target.closest("a, button")) {
      e.preventDefault();
      if (CLASSES.includes(model.cls)) label(model.cls);
      else saved.textContent = "The model gave no kind: choose 2 (green) or 3 (iodine).";
    }
    else if (e.key === "u") { e.preventDefault(); send(base + "/undo", {seen, shown}, "undo"); }
    else if (e.key === "ArrowRight" && root.dataset.next) location.href = root.dataset.next;
    else if (e.key === "ArrowLeft" && root.dataset.prev) location.href = root.dataset.prev;
  });

  document.documentElement.dataset.keys = "on";  // listeners attached: the tests wait for this
  if (!W || !H) return;
  let start = null;
  const at = e => { const r = stage.getBoundingClientRect();
    return [Math.min(Math.max(0, (e.clientX - r.left) / r.width), 1) * W, Math.min(Math.max(0, (e.clientY - r.top) / r.height), 1) * H]; };
  const rect = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  stage.addEventListener("pointerdown", e => { start = at(e); stage.setPointerCapture(e.pointerId); e.preventDefault(); });
  stage.addEventListener("pointermove", e => { if (start) placeBox(box, rect(start, at(e)), W, H); });
  stage.addEventListener("pointerup", e => {
    if (!start) return;
    const b = rect(start, at(e)); start = null;
    if (b[2] - b[0] < 4 || b[3] - b[1] < 4) { location.reload(); return; }  // a click, not a drag
    send(base + "/decision", {box: b, seen, shown}, "box");
  });
})();
