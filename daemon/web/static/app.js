// cliptagd's gallery: the little the pages do in the browser. No framework, no build step,
// no inline script (the Content-Security-Policy forbids it): the pages work without this
// file, which adds the per-label score chart and a live status while photos are tagged.
"use strict";

// A photo's every-label scores need the model, which the server loads on the first request
// (seconds): the page renders at once, and the chart arrives when the model is ready.
function loadScores(box) {
  const id = box.dataset.photo;
  fetch(`/api/photos/${encodeURIComponent(id)}/scores`, { credentials: "same-origin" })
    .then(async (response) => {
      if (response.status === 503) {
        const wait = Number(response.headers.get("Retry-After")) || 0;
        const body = await response.json();
        // While the model loads, say so and ask again; a model that failed to load says why.
        note(box, wait ? "Loading the model… the scores follow in a few seconds." : body.detail);
        if (wait) setTimeout(() => loadScores(box), wait * 1000);
        return;
      }
      if (!response.ok) {
        note(box, `The scores could not be read (${response.status}).`);
        return;
      }
      drawScores(box, await response.json());
    })
    .catch(() => note(box, "The scores could not be read."));
}

function note(box, text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  box.replaceChildren(p);
}

// One section per label set, labels best first, each a <meter>: no inline style needed.
function drawScores(box, rows) {
  if (!rows.length) {
    note(box, "No scores: this photo has no stored embedding by the model yet.");
    return;
  }
  const kept = new Set(
    Array.from(document.querySelectorAll("table.tags tr"), (tr) =>
      Array.from(tr.cells).slice(0, 2).map((td) => td.textContent).join("\u0000"),
    ),
  );
  const bySet = new Map();
  for (const row of rows) {
    if (!bySet.has(row.set)) bySet.set(row.set, []);
    bySet.get(row.set).push(row);
  }
  box.replaceChildren();
  for (const [name, list] of bySet) {
    const heading = document.createElement("h3");
    heading.textContent = name;
    box.append(heading);
    list.sort((a, b) => b.score - a.score);
    for (const row of list) {
      const line = document.createElement("div");
      line.className = "bar";
      if (kept.has(`${row.set}\u0000${row.label}`)) line.classList.add("kept");
      const label = document.createElement("span");
      label.textContent = row.label;
      label.title = row.label;
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = 1;
      meter.value = row.score;
      meter.textContent = row.score.toFixed(2);
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = row.score.toFixed(2);
      line.append(label, meter, value);
      box.append(line);
    }
  }
}

// While photos wait to be tagged, the status updates itself every few seconds, and once two
// readings are apart, estimates the time left from the rate between them.
function followStatus(section) {
  const first = { at: Date.now(), waiting: Number(section.dataset.waiting) };
  const tick = () => {
    fetch("/api/status", { credentials: "same-origin" })
      .then((response) => (response.ok ? response.json() : null))
      .then((status) => {
        if (!status) return;
        for (const el of section.querySelectorAll("[data-count]")) {
          el.textContent = status[el.dataset.count];
        }
        const waiting = status.pending + status.stale;
        const total = status.pending + status.stale + status.tagged + status.failed;
        const bar = section.querySelector("progress");
        if (bar) {
          bar.max = total;
          bar.value = total - waiting;
        }
        const text = section.querySelector(".progress-text");
        if (text) text.textContent = `${total - waiting} of ${total} done, ${waiting} to go`;
        const estimate = section.querySelector(".estimate");
        const seconds = (Date.now() - first.at) / 1000;
        const rate = (first.waiting - waiting) / seconds;
        if (estimate) {
          estimate.textContent =
            waiting === 0 ? "all done" : rate > 0 ? `about ${duration(waiting / rate)} left` : "";
        }
        if (waiting > 0) setTimeout(tick, 5000);
      })
      .catch(() => setTimeout(tick, 15000));
  };
  setTimeout(tick, 5000);
}

function duration(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

document.addEventListener("DOMContentLoaded", () => {
  const scores = document.getElementById("scores");
  if (scores) loadScores(scores);
  const status = document.getElementById("status");
  if (status && Number(status.dataset.waiting) > 0) followStatus(status);
});
