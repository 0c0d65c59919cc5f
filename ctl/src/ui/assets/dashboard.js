// The Flotte dashboard's only script (served from the binary; the
// Content-Security-Policy forbids inline scripts). It does two things:
// asks for confirmation before a form marked data-confirm is posted, and
// keeps each section marked data-live current from its server-sent event
// stream. A message's data is HTML the dashboard rendered and escaped on
// the server; text in "problem" events is only ever set as textContent.
"use strict";

document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) {
    event.preventDefault();
  }
});

function showStatus(text, className) {
  const status = document.getElementById("live-status");
  if (status) {
    status.textContent = text;
    status.className = className;
  }
}

function follow(section) {
  const source = new EventSource(section.dataset.live);
  source.onopen = () => showStatus("live", "live");
  source.onerror = () => showStatus("reconnecting…", "stale");
  source.onmessage = (event) => {
    section.innerHTML = event.data;
    section.dataset.updates = String(Number(section.dataset.updates || "0") + 1);
  };
  source.addEventListener("problem", (event) => showStatus(event.data, "stale"));
  source.addEventListener("end", () => {
    source.close();
    showStatus("final", "final");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(follow);
});
