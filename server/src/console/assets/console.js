// The Tidings console's only script: live previews of forms, the trigger fields that apply,
// and run counters over server-sent events. Every page works without it.
"use strict";

function csrf() {
  return document.body.dataset.csrf || "";
}

// Forms with data-preview post themselves there as they change and show the answer.
function previews() {
  for (const form of document.querySelectorAll("form[data-preview]")) {
    const target = document.querySelector(form.dataset.target);
    if (!target) continue;
    let timer = null;
    let sent = 0;
    const refresh = () => {
      const body = new URLSearchParams(new FormData(form));
      body.set("csrf", csrf());
      const mine = ++sent;
      fetch(form.dataset.preview, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body,
        credentials: "same-origin",
      })
        .then((r) => r.text())
        .then((html) => {
          if (mine === sent) target.innerHTML = html;
        })
        .catch(() => {});
    };
    form.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(refresh, 250);
    });
    refresh();
  }
}

// A campaign form shows the fields of the chosen trigger only.
function triggers() {
  for (const form of document.querySelectorAll("form.campaign")) {
    const show = () => {
      const chosen = form.querySelector("input[name=trigger]:checked");
      for (const part of form.querySelectorAll(".when")) {
        part.classList.toggle("shown", !!chosen && part.dataset.trigger === chosen.value);
      }
    };
    form.addEventListener("change", show);
    show();
  }
}

// A run's counters follow its server-sent events; the chart draws contacts done over time.
function runs() {
  const root = document.querySelector("[data-run]");
  if (!root) return;
  const svg = root.querySelector("#run-progress polyline");
  const points = [];
  const started = Date.now();
  const draw = (run) => {
    for (const el of root.querySelectorAll("[data-counter]")) {
      const name = el.dataset.counter;
      if (name === "state") {
        el.innerHTML = "";
        const badge = document.createElement("span");
        const tone = { completed: "good", cancelled: "bad", running: "warn", paused: "warn", scheduled: "warn" }[run.state] || "muted";
        badge.className = "badge " + tone;
        badge.textContent = run.state;
        el.appendChild(badge);
      } else if (name === "progress") {
        const done = run.delivered + run.failed + run.skipped;
        el.textContent = run.audience ? Math.round((100 * done) / run.audience) + "%" : "";
      } else if (name in run) {
        el.textContent = run[name];
      }
    }
    const reasons = root.querySelector("#skipped-reasons");
    if (reasons) {
      reasons.innerHTML = "";
      const entries = Object.entries(run.skipped_by_reason || {}).sort();
      for (const [reason, n] of entries.length ? entries : [["none", ""]]) {
        const li = document.createElement("li");
        li.textContent = n === "" ? reason : reason + ": " + n;
        reasons.appendChild(li);
      }
    }
    points.push([(Date.now() - started) / 1000, run.delivered + run.failed + run.skipped, run.audience]);
    if (svg) {
      const span = Math.max(1, points[points.length - 1][0]);
      const top = Math.max(1, ...points.map((p) => p[2] || p[1]));
      svg.setAttribute("points", points.map((p) => `${((p[0] / span) * 600).toFixed(1)},${(120 - (p[1] / top) * 116).toFixed(1)}`).join(" "));
    }
  };
  draw(JSON.parse(root.dataset.run));
  if (!root.dataset.live || !window.EventSource) return;
  const source = new EventSource(root.dataset.live);
  source.addEventListener("run", (e) => {
    const run = JSON.parse(e.data);
    draw(run);
    if (run.state === "completed" || run.state === "cancelled") {
      source.close();
      for (const form of document.querySelectorAll("form[action$='/control']")) form.remove();
    }
  });
  source.addEventListener("failed", () => source.close());
}

document.addEventListener("DOMContentLoaded", () => {
  previews();
  triggers();
  runs();
});
