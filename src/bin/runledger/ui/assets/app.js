// runledger dashboard: live events on a run's page, lease countdowns, and a
// refresh of pages marked data-refresh. Plain JavaScript, no build step.
"use strict";

// Server clock minus ours, from the page that rendered the lease (so a
// countdown is right on a machine whose clock is off).
let skewMs = 0;

function countdowns() {
  for (const el of document.querySelectorAll(".countdown")) {
    if (el.dataset.serverNowMs) skewMs = Number(el.dataset.serverNowMs) - Date.now();
    const left = (Number(el.dataset.untilMs) - (Date.now() + skewMs)) / 1000;
    el.textContent = left > 0 ? left.toFixed(1) + " s" : "expired " + (-left).toFixed(1) + " s ago";
    el.classList.toggle("expired", left <= 0);
  }
}

function cell(row, text, code) {
  const td = document.createElement("td");
  if (code) {
    const c = document.createElement("code");
    c.textContent = text;
    td.appendChild(c);
  } else {
    td.textContent = text;
  }
  row.appendChild(td);
}

function when(epochS) {
  return new Date(epochS * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function liveEvents() {
  const table = document.querySelector("#events[data-live]");
  if (!table || !window.EventSource) return;
  const state = document.getElementById("live-state");
  const body = table.querySelector("tbody");
  const source = new EventSource(table.dataset.live);
  state.textContent = "live: new events appear as they are appended";
  source.addEventListener("run-event", (msg) => {
    const e = JSON.parse(msg.data);
    if (body.querySelector(`tr[data-seq="${e.sequence}"]`)) return;
    const row = document.createElement("tr");
    row.dataset.seq = String(e.sequence);
    row.className = "new";
    cell(row, String(e.sequence));
    cell(row, e.type);
    cell(row, e.source);
    cell(row, when(e.created_at));
    let data = JSON.stringify(e.data);
    if (data.length > 2000) data = data.slice(0, 2000) + "…";
    cell(row, data, true);
    body.appendChild(row);
  });
  source.addEventListener("end", (msg) => {
    const end = JSON.parse(msg.data);
    state.textContent = "run finished: " + end.status;
    const status = document.getElementById("status");
    if (status) {
      status.textContent = end.status;
      status.className = "status " + end.status;
    }
    source.close();
  });
  source.addEventListener("failed", (msg) => {
    state.textContent = "live view stopped: " + JSON.parse(msg.data).error;
    source.close();
  });
}

// Pages with <main data-refresh="N"> reload their content every N seconds,
// unless a form on them has focus (someone is typing a reason).
function refresh() {
  const main = document.querySelector("main[data-refresh]");
  if (!main) return;
  const every = Number(main.dataset.refresh) * 1000;
  setInterval(async () => {
    if (document.activeElement && document.activeElement.closest("form")) return;
    try {
      const response = await fetch(location.href, { headers: { "X-Refresh": "1" } });
      if (!response.ok) return;
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = doc.querySelector("main");
      if (fresh) {
        main.innerHTML = fresh.innerHTML;
        countdowns();
      }
    } catch (_) {
      // The next tick tries again.
    }
  }, every);
}

countdowns();
setInterval(countdowns, 250);
liveEvents();
refresh();
