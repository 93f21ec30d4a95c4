// The gallery's script: live progress (polls the page's data-poll URL), the batch page's grid
// refreshed as jobs finish, confirmation before a cancel, and "copy parameters". No build step.
"use strict";

const POLL_MS = 2000;

function setFields(scope, p) {
  for (const el of scope.querySelectorAll("[data-field]")) {
    const field = el.dataset.field;
    if (field === "bar") {
      el.max = Math.max(p.total, 1);
      el.value = p.done + p.failed;
    } else if (field in p) {
      el.textContent = String(p[field]);
    }
  }
}

function settled(p) {
  return p.state === "finished" || p.state === "cancelled";
}

// The JSON at url; null when the page should stop polling (the session ended: off to the login page,
// or the batch is gone), undefined when this poll failed (the service restarting, 429, 503): try again.
async function getJSON(url) {
  let r;
  try {
    r = await fetch(url, {credentials: "same-origin", cache: "no-store"});
  } catch {
    return undefined;
  }
  if (r.status === 401) {
    location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
    return null;
  }
  if (r.status === 404) return null;
  return r.ok ? r.json() : undefined;
}

async function refreshTiles() {
  const tiles = document.getElementById("tiles");
  if (!tiles || !tiles.querySelector(".tile.pending")) return;
  try {
    const r = await fetch(tiles.dataset.refresh, {credentials: "same-origin", cache: "no-store"});
    if (r.ok) tiles.innerHTML = await r.text();  // our own server-rendered, escaped HTML
  } catch {
    // the next poll tries again
  }
}

function pollBatches(table) {  // the batch list: one row per batch
  const tick = async () => {
    const data = await getJSON(table.dataset.poll);
    if (data === null) return;
    if (data === undefined) return void setTimeout(tick, POLL_MS);
    for (const p of data.batches) {
      const row = table.querySelector(`tr[data-batch="${p.batch_id}"]`);
      if (row) setFields(row, p);
    }
    if (data.batches.some(p => !settled(p))) setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

function pollBatch(section) {  // one batch: its counts, its state, its grid
  let moved = Number(section.querySelector('[data-field="bar"]').value);  // as the page was rendered
  const tick = async () => {
    const p = await getJSON(section.dataset.poll);
    if (p === null) return;
    if (p === undefined) return void setTimeout(tick, POLL_MS);
    setFields(section, p);
    if (p.done + p.failed !== moved) {
      moved = p.done + p.failed;
      await refreshTiles();
    }
    if (!settled(p)) {
      setTimeout(tick, POLL_MS);
    } else {
      await refreshTiles();
      for (const form of section.querySelectorAll(".actions form")) {  // what is left to press
        const action = form.querySelector("button").value;
        form.hidden = p.state === "finished" || action !== "resume";
      }
    }
  };
  setTimeout(tick, POLL_MS);
}

async function copy(button) {
  const text = document.querySelector(button.dataset.copy).textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard API (plain http on another host): select the text for Ctrl+C
    const range = document.createRange();
    range.selectNodeContents(document.querySelector(button.dataset.copy));
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    document.execCommand("copy");
  }
  const done = button.nextElementSibling;
  if (done) done.hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector("table.batches[data-poll]");
  if (table) pollBatches(table);
  const section = document.querySelector("section.progress[data-poll]");
  if (section) pollBatch(section);
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", e => { if (!confirm(form.dataset.confirm)) e.preventDefault(); });
  }
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", () => copy(button));
  }
});
