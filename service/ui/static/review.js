// Review page: the stage-2 score histogram with the stored threshold, and a what-if line that
// recounts, exactly and under the job's policy, how many labels would change if it moved.
"use strict";
(function () {
  const panel = document.getElementById("whatif");
  if (!panel) return;
  const canvas = document.getElementById("hist"), slider = document.getElementById("thr");
  const out = document.getElementById("thr-value"), text = document.getElementById("whatif-text");

  fetch(panel.dataset.scores, {credentials: "same-origin"}).then(r => r.json()).then(data => {
    const idx = data.score === "deep_sad" ? 0 : 1, stored = data.thresholds[data.score];
    const xs = data.points.map(p => p[idx]);
    if (!xs.length) { text.textContent = "No image reached stage 2."; slider.disabled = true; return; }
    // a loop, not Math.min(...xs): spreading passes every score as an argument, and past about
    // 125,000 of them V8 threw RangeError and the histogram stayed blank
    const lo = xs.reduce((a, x) => Math.min(a, x), stored), hi = xs.reduce((a, x) => Math.max(a, x), stored);
    const span = (hi - lo) || 1;
    slider.min = lo; slider.max = hi; slider.step = "any"; slider.value = stored;  // any: no snapping

    const flagged = (p, thr) => {
      const sad = p[0] >= (data.score === "deep_sad" ? thr : data.thresholds.deep_sad);
      const res = p[1] >= (data.score === "resnest" ? thr : data.thresholds.resnest);
      const colour = p[2] != null && data.thresholds.colour != null && p[2] >= data.thresholds.colour;
      return {deep_sad: sad, resnest: res, either: sad || res, both: sad && res,
              two_of_three: sad + res + colour >= 2}[data.policy];
    };
    const now = data.points.map(p => flagged(p, stored));

    function draw(thr) {
      const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, bins = 40;
      const counts = new Array(bins).fill(0);
      xs.forEach(x => counts[Math.min(bins - 1, Math.floor((x - lo) / span * bins))]++);
      const top = Math.max(...counts);
      ctx.clearRect(0, 0, W, H);
      ctx.fillStyle = "#7a8794";
      counts.forEach((c, i) => ctx.fillRect(i * W / bins + 1, H - 16 - (H - 24) * c / top, W / bins - 2, (H - 24) * c / top));
      const line = (v, colour, dash) => { const x = (v - lo) / span * W; ctx.strokeStyle = colour; ctx.setLineDash(dash);
        ctx.lineWidth = 2; ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, H - 16); ctx.stroke(); };
      line(stored, "#a4001d", []); line(thr, "#0b5cad", [5, 4]);
      ctx.fillStyle = "#1b1f24"; ctx.setLineDash([]); ctx.font = "11px sans-serif";
      ctx.fillText(lo.toPrecision(3), 2, H - 3); ctx.textAlign = "right"; ctx.fillText(hi.toPrecision(3), W - 2, H - 3); ctx.textAlign = "left";
    }
    function update() {
      const thr = parseFloat(slider.value);
      out.textContent = thr.toFixed(3);
      slider.setAttribute("aria-valuetext", thr.toFixed(3));  // read out as shown, not 0.50004208...
      let toNon = 0, toReg = 0;
      data.points.forEach((p, i) => { const f = flagged(p, thr); if (f && !now[i]) toNon++; if (!f && now[i]) toReg++; });
      text.textContent = (toNon + toReg) + " of " + xs.length + " would change label (" + toNon +
        " regular → non-regular, " + toReg + " non-regular → regular).";
      draw(thr);
    }
    slider.addEventListener("input", update);
    draw(stored);
  }).catch(() => { text.textContent = "The scores could not be loaded: reload the page."; slider.disabled = true; });
})();
