// Shared by the pages: the CSRF token the server put on <main>, the prefix on <body>, and a JSON POST.
"use strict";
const csrf = () => document.querySelector("main").dataset.csrf;
// the service's path behind a reverse proxy (CERVIXQC_ROOT_PATH), "" without one
const BASE = document.body.dataset.base || "";
async function postJSON(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
                              body: JSON.stringify(body || {}), credentials: "same-origin"});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}
const WORDS = {regular: "regular", green: "non-regular: green filter", iodine: "non-regular: Lugol's iodine",
               non_regular: "non-regular", no_cervix: "no cervix", unreadable: "unreadable"};
function placeBox(el, box, w, h) {
  if (!box || !w || !h) { el.hidden = true; return; }
  el.hidden = false;
  el.style.left = (100 * box[0] / w) + "%"; el.style.top = (100 * box[1] / h) + "%";
  el.style.width = (100 * (box[2] - box[0]) / w) + "%"; el.style.height = (100 * (box[3] - box[1]) / h) + "%";
}
