// The console's progressive enhancement: the job page follows its job's server-sent events
// (/console/jobs/{id}/events, the API's stream behind the session cookie) and updates state, progress bars,
// attempts and errors in place; once the job ends, or starts waiting for an operator or a retry, the page
// reloads to show the actions of that state. Forms marked
// `confirm` ask first. Without JavaScript every page still works (reload to refresh).
"use strict";

function text(element, value) {
  if (element) element.textContent = value === null || value === undefined ? "" : String(value);
}

function setState(element, state) {
  if (!element) return;
  element.textContent = state;
  element.className = element.className.replace(/\bstate-\S+/g, "").trim() + " state-" + state;
}

function when(value) {
  if (!value) return "—";
  const moment = new Date(value);
  return isNaN(moment) ? value : moment.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function showSnapshot(section, snapshot) {
  setState(document.getElementById("job-state"), snapshot.state);
  const bar = document.getElementById("job-progress");
  if (bar) bar.value = snapshot.percent;
  text(document.getElementById("job-percent"), snapshot.percent);
  text(document.getElementById("job-error"), snapshot.error);
  text(document.getElementById("job-next-attempt"), when(snapshot.next_attempt_at));
  for (const step of snapshot.steps) {
    const row = section.querySelector('tr[data-step="' + CSS.escape(step.id) + '"]');
    if (!row) continue;
    setState(row.querySelector(".step-state"), step.state);
    text(row.querySelector(".step-attempts"), step.attempts);
    const stepBar = row.querySelector(".step-progress");
    if (stepBar) stepBar.value = step.progress.percent;
    text(row.querySelector(".step-percent"), step.progress.percent);
    text(row.querySelector(".step-next"), when(step.next_attempt_at));
    text(row.querySelector(".step-error"), step.error);
  }
  section.dataset.live = "true";
}

function followJob(section) {
  if (section.dataset.active !== "true" || !window.EventSource) return;
  const source = new EventSource(section.dataset.events);
  const onSnapshot = (event) => showSnapshot(section, JSON.parse(event.data));
  source.addEventListener("progress", (event) => {
    onSnapshot(event);
    // Waiting for an operator or a retry: the page again, with the buttons (resume, retry now) that state offers.
    const state = JSON.parse(event.data).state;
    if (state !== section.dataset.state && state.startsWith("waiting")) {
      source.close();
      window.location.reload();
    }
  });
  source.addEventListener("end", (event) => {
    onSnapshot(event);
    source.close();
    // The job has ended: the page again, with the actions its final state allows.
    window.setTimeout(() => window.location.reload(), 300);
  });
  source.addEventListener("error", () => {
    // The session ended or the server went away: stop, and let a reload say why.
    if (source.readyState === EventSource.CLOSED) section.dataset.live = "lost";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const section = document.getElementById("job");
  if (section) followJob(section);
  for (const form of document.querySelectorAll("form.confirm")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm || "Are you sure?")) event.preventDefault();
    });
  }
});
