// The trainjob dashboard: the jobs overview (#/) and one job's page (#/jobs/{id}).
// Everything shown comes from the public API and is written with textContent or
// setAttribute, never parsed as HTML.

import { api, ApiError, apiKey, openEventStream, setApiKey } from "./api.js";
import { formatNumber, LineChart } from "./chart.js";

const POLL_MS = 2000;
const PAGE = 20;
const STATUSES = [
  "queued", "running", "cancelling", "pausing", "paused", "succeeded", "failed", "cancelled",
];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// A paused job is cancelled at once, a pausing one stops as a running one does.
const CANCELLABLE = new Set(["queued", "running", "pausing", "paused"]);
// A queued job pauses at once, a running one at its next optimizer step; a paused one
// resumes (back to the queue).
const PAUSABLE = new Set(["queued", "running"]);
const RESUMABLE = new Set(["paused"]);
const LISTED_EVENTS = ["status", "checkpoint", "oom_backoff", "overflow_skip", "warning", "error"];
const EVENT_PAGES = 10;
// Stored steps the page replays for its charts at most (evenly spread, the newest
// exact): a run of a million steps opens as fast as one of a thousand.
const METRICS_BACKLOG = 2000;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- building DOM

// el("td", {class: "num", title: "…", "data-x": "1"}, "text", childNode, …)
function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function badge(status) {
  return el("span", { class: "badge", "data-status": status }, status);
}

function jobHref(id) {
  return `#/jobs/${encodeURIComponent(id)}`;
}

function jobPath(id, rest = "") {
  return `/v1/jobs/${encodeURIComponent(id)}${rest}`;
}

// ---------------------------------------------------------------- formatting

const integer = new Intl.NumberFormat("en-US");
const clock = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});
const dateTime = new Intl.DateTimeFormat(undefined, {
  month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  hour12: false,
});

const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const fmtInt = (value) => (isNumber(value) ? integer.format(value) : "–");

function fmtLoss(value) {
  if (!isNumber(value)) return "–";
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
  return value.toFixed(Math.abs(value) >= 100 ? 1 : 4);
}

function fmtRate(value) {
  if (!isNumber(value)) return "–";
  return value >= 100 ? integer.format(Math.round(value)) : value.toFixed(1);
}

function fmtDuration(seconds) {
  if (!isNumber(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${String(s % 60).padStart(2, "0")} s`;
  if (s < 86400) {
    return `${Math.floor(s / 3600)} h ${String(Math.floor(s / 60) % 60).padStart(2, "0")} m`;
  }
  return `${Math.floor(s / 86400)} d ${Math.floor(s / 3600) % 24} h`;
}

function secondsSince(iso) {
  return (Date.now() - Date.parse(iso)) / 1000;
}

function fmtAge(iso) {
  if (!iso) return "–";
  const s = Math.max(0, secondsSince(iso));
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

const fmtClock = (iso) => (iso ? clock.format(new Date(iso)) : "–");
const fmtDateTime = (iso) => (iso ? dateTime.format(new Date(iso)) : "–");

function fmtBytes(bytes) {
  if (!isNumber(bytes)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value >= 10 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

// How far a job is: by steps, or by epochs for a job that has no step budget.
function progressOf(job) {
  const { step, max_steps: maxSteps, epoch } = job.progress;
  const epochs = job.spec && job.spec.epochs;
  let fraction = 0;
  let text = `step ${fmtInt(step)}`;
  if (maxSteps) {
    fraction = step / maxSteps;
    text = `${fmtInt(step)} / ${fmtInt(maxSteps)}`;
  } else if (epochs) {
    fraction = epoch / epochs;
    text = `epoch ${fmtInt(epoch)} / ${fmtInt(epochs)} · step ${fmtInt(step)}`;
  }
  if (job.status === "succeeded") fraction = 1;
  return { fraction: Math.max(0, Math.min(1, fraction)), text };
}

function progressBar(job, big = false) {
  const { fraction } = progressOf(job);
  const fill = el("div", { class: "bar-fill", "data-status": job.status });
  fill.style.width = `${(fraction * 100).toFixed(1)}%`; // CSSOM: allowed by the CSP
  const title = `${(fraction * 100).toFixed(0)}%`;
  return el("div", { class: big ? "bar big" : "bar", title }, fill);
}

function batchCell(job) {
  // m × k is the full window's split; an epoch's short last window is flagged beside it,
  // not shown as a split of its own.
  const last = job.progress ? job.progress.last_window_samples : null;
  const partial = isNumber(last) && last < job.batch_size;
  return el("span", {
    class: "batch",
    title: partial ? `the latest step trained an epoch's partial last window: ${last} samples` : null,
  },
    el("strong", {}, fmtInt(job.batch_size)),
    el("span", { class: "muted" }, ` = ${job.micro_batch_size} × ${job.accumulation_steps}`),
    partial ? el("span", { class: "muted" }, ` · last window ${fmtInt(last)}`) : null);
}

function modelSummary(spec) {
  if (!spec) return "";
  const parts = [];
  if (spec.model) parts.push(spec.model.type);
  if (spec.dataset) parts.push(spec.dataset.type);
  if (spec.optimizer) parts.push(`${spec.optimizer.type} lr ${formatNumber(spec.optimizer.lr)}`);
  if (spec.precision) parts.push(spec.precision);
  if (spec.device && spec.device !== "auto") parts.push(spec.device);
  return parts.join("  ·  ");
}

// ---------------------------------------------------------------- page chrome

function connection(state, text) {
  const node = $("connection");
  node.dataset.state = state;
  $("connection-text").textContent = text;
}

function showView(id) {
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== id;
}

function showKeyForm(message) {
  const form = $("key-form");
  form.hidden = false;
  form.querySelector("label").textContent = message
    || "This service needs an API key. It is kept in this tab only.";
  $("key-input").focus();
}

function handleFailure(error) {
  if (error instanceof ApiError && error.status === 401) {
    connection("offline", "API key needed");
    showKeyForm(apiKey() ? `That key was refused: ${error.message}` : null);
  } else {
    connection("offline", error instanceof ApiError ? error.message : "offline");
  }
}

// A new or forgotten key starts the page over (the key stays in sessionStorage): what
// the previous key could see must not stay on screen while the next key is refused.
function setupKeyForm() {
  const form = $("key-form");
  $("key-button").hidden = !apiKey();
  $("key-button").addEventListener("click", () => { form.hidden = !form.hidden; });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("key-input").value.trim());
    location.reload();
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey(null);
    location.reload();
  });
}

// A loop that runs `task` (now, unless `later`) and then every POLL_MS until stopped;
// a hidden tab skips its turns.
function poller(task, { later = false } = {}) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) await task();
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };
  if (later) timer = setTimeout(tick, POLL_MS);
  else tick();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---------------------------------------------------------------- overview

function overviewView(filter) {
  showView("view-overview");
  document.title = "trainjob";
  const view = { stopped: false, jobs: [], hasMore: false, tailHasMore: false };
  renderFilters(filter, null);

  const query = (extra) => {
    const params = new URLSearchParams(extra);
    if (filter) params.set("status", filter);
    return `/v1/jobs?${params}`;
  };

  const refresh = async () => {
    try {
      const limit = Math.min(100, Math.max(PAGE, view.jobs.length));
      const [page, dashboard] = await Promise.all([api(query({ limit })), api("/v1/dashboard")]);
      if (view.stopped) return;
      // The first page is fresh; pages loaded with "More" stay below it.
      const last = page.data[page.data.length - 1];
      const tail = page.has_more && last ? view.jobs.filter((job) => job.id < last.id) : [];
      view.jobs = page.data.concat(tail);
      view.hasMore = tail.length ? view.tailHasMore : page.has_more;
      renderJobs(view);
      renderDashboard(dashboard, filter);
      connection("live", "live");
    } catch (error) {
      if (!view.stopped) handleFailure(error);
    }
  };

  const more = async () => {
    const last = view.jobs[view.jobs.length - 1];
    if (!last) return;
    $("jobs-more").disabled = true;
    try {
      const page = await api(query({ limit: PAGE, after: last.id }));
      if (view.stopped) return;
      const known = new Set(view.jobs.map((job) => job.id));
      view.jobs = view.jobs.concat(page.data.filter((job) => !known.has(job.id)));
      view.tailHasMore = page.has_more;
      view.hasMore = page.has_more;
      renderJobs(view);
    } catch (error) {
      handleFailure(error);
    } finally {
      $("jobs-more").disabled = false;
    }
  };
  $("jobs-more").onclick = more;

  const stopPolling = poller(refresh);
  return () => { view.stopped = true; stopPolling(); $("jobs-more").onclick = null; };
}

function renderFilters(active, counts) {
  const chips = [["", "All", counts ? Object.values(counts).reduce((a, b) => a + b, 0) : null]];
  for (const status of STATUSES) chips.push([status, status, counts ? counts[status] : null]);
  $("filters").replaceChildren(...chips.map(([status, label, count]) => el("a", {
    class: "chip",
    href: status ? `#/?status=${status}` : "#/",
    role: "tab",
    "aria-selected": String((active || "") === status),
    "data-filter": status || "all",
    "data-status": status || null,
  }, label, count === null ? null : el("span", { class: "chip-count" }, fmtInt(count)))));
}

function renderJobs(view) {
  const body = $("jobs-body");
  const existing = new Map([...body.children].map((row) => [row.dataset.jobId, row]));
  const rows = view.jobs.map((job) => {
    const row = existing.get(job.id) || newJobRow(job.id);
    updateJobRow(row, job);
    return row;
  });
  body.replaceChildren(...rows); // moves known rows: they keep their identity
  $("jobs-empty").hidden = rows.length > 0;
  $("jobs-table").hidden = rows.length === 0;
  $("jobs-more").hidden = !view.hasMore;
}

function newJobRow(id) {
  const row = el("tr", { "data-job-id": id, class: "job-row" });
  row.addEventListener("click", (event) => {
    if (!event.target.closest("a")) location.hash = jobHref(id);
  });
  return row;
}

// POST /v1/jobs/{id}/pause or /resume; the job as it is after.
function pauseOrResume(id, action) {
  return api(jobPath(id, `/${action}`), { method: "POST" });
}

// The pause or resume button of a row of the jobs table (none for other statuses).
function rowAction(row, job) {
  const action = PAUSABLE.has(job.status) ? "pause" : RESUMABLE.has(job.status) ? "resume" : null;
  if (!action) return null;
  const button = el("button", {
    type: "button", class: `small ${action}-button`, "data-action": action,
    title: action === "pause" ? "keep its checkpoint and free its device" : "queue it again",
  }, action === "pause" ? "Pause" : "Resume");
  button.addEventListener("click", async (event) => {
    event.stopPropagation(); // not a click on the row, which opens the job
    button.disabled = true;
    try {
      updateJobRow(row, await pauseOrResume(job.id, action));
    } catch (error) {
      button.disabled = false;
      button.title = `Could not ${action}: ${error.message}`;
    }
  });
  return button;
}

function updateJobRow(row, job) {
  const metrics = job.metrics || {};
  const live = ["running", "cancelling", "pausing"].includes(job.status);
  row.dataset.status = job.status;
  row.replaceChildren(
    el("td", { class: "col-job" },
      el("a", { href: jobHref(job.id), class: "job-name" }, job.name || "Untitled job"),
      el("div", { class: "job-sub mono" }, job.id)),
    el("td", { class: "col-status" }, badge(job.status)),
    el("td", { class: "col-priority num" }, fmtInt(job.priority)),
    el("td", { class: "col-progress" },
      progressBar(job), el("div", { class: "progress-caption" }, progressOf(job).text)),
    el("td", { class: "col-batch num" }, batchCell(job)),
    el("td", { class: "col-loss num" }, fmtLoss(metrics.loss)),
    el("td", { class: "col-rate num" }, live ? fmtRate(metrics.samples_per_sec) : "–"),
    el("td", { class: "col-age num", title: fmtDateTime(job.created_at) }, fmtAge(job.created_at)),
    el("td", { class: "col-actions" }, rowAction(row, job)),
  );
}

function renderDashboard(dashboard, filter) {
  const { counts } = dashboard;
  renderFilters(filter, counts);
  $("stat-running").textContent = fmtInt(counts.running);
  $("stat-cancelling").textContent = counts.cancelling
    ? `${fmtInt(counts.cancelling)} cancelling` : "training now";
  $("stat-queued").textContent = fmtInt(counts.queued);
  $("stat-queue-depth").textContent = `${fmtInt(dashboard.queue_depth)} waiting in the broker`;
  const finished = dashboard.finished_last_hour;
  const total = finished.succeeded + finished.failed + finished.cancelled;
  $("stat-finished").textContent = fmtInt(total);
  $("stat-finished-split").replaceChildren(
    ...["succeeded", "failed", "cancelled"].map((status) => el("span", {
      class: "split", "data-status": status,
    }, el("span", { class: "split-dot" }), `${fmtInt(finished[status])} ${status}`)),
  );
  const devices = {};
  for (const worker of dashboard.workers) {
    devices[worker.device] = (devices[worker.device] || 0) + 1;
  }
  $("stat-workers").textContent = fmtInt(dashboard.workers.length);
  $("stat-devices").textContent = Object.entries(devices)
    .map(([device, n]) => `${n} ${device}`).join(" · ") || "none alive";
  renderWorkers(dashboard.workers);
  renderQueue(dashboard.queue);
  renderPaused(dashboard.paused);
  renderTenants(dashboard.tenants);
}

function sideJob(job, ...rest) {
  return el("li", { class: "side-item", "data-job-id": job.id, "data-status": job.status },
    ...rest,
    el("a", { href: jobHref(job.id), title: job.id }, job.name || job.id));
}

// The head of the queue in claim order: a position counts the jobs of the same device
// count that would run before it (each device count is a queue of its own).
function renderQueue(queue) {
  $("queue").replaceChildren(...queue.map((job) => sideJob(
    { ...job, status: "queued" },
    el("span", { class: "position", title: "jobs that would run before it" },
      `#${job.queue_position + 1}`),
    el("span", { class: "meta", title: "priority" }, `p${job.priority}`),
    job.devices > 1 ? el("span", { class: "meta" }, `${job.devices} devices`) : null,
  )));
  $("queue-empty").hidden = queue.length > 0;
}

function renderPaused(paused) {
  $("paused").replaceChildren(...paused.map((job) => sideJob(job,
    badge(job.status),
    el("span", { class: "meta" }, progressOf(job).text))));
  $("paused-empty").hidden = paused.length > 0;
}

function renderTenants(tenants) {
  $("tenants").replaceChildren(...tenants.map((tenant) => el("tr", { "data-tenant": tenant.name },
    el("td", {}, tenant.name),
    el("td", { class: "num" }, fmtInt(tenant.running_devices)),
    el("td", { class: "num" }, fmtInt(tenant.queued_jobs)),
    el("td", { class: "num", title: `${fmtInt(Math.round(tenant.device_seconds_recent))} device-seconds` },
      fmtDuration(tenant.device_seconds_recent)))));
}

function renderWorkers(workers) {
  $("workers").replaceChildren(...workers.map((worker) => {
    const device = worker.cuda_visible_devices
      ? `${worker.device} · ${worker.cuda_visible_devices}` : worker.device;
    const job = worker.job_id
      ? el("a", { href: jobHref(worker.job_id), class: "mono" }, worker.job_id)
      : el("span", { class: "muted" }, "idle");
    return el("li", { class: "worker", "data-worker": worker.name },
      el("div", { class: "worker-top" },
        el("span", { class: "worker-name mono", title: worker.name }, worker.name),
        el("span", { class: "device", "data-device": worker.device }, device)),
      el("div", { class: "worker-job" }, job),
      el("div", { class: "worker-meta muted" },
        `seen ${fmtAge(worker.last_seen)} ago · up ${fmtAge(worker.started_at)} · `,
        worker.queues.join(", ")));
  }));
  $("workers-empty").hidden = workers.length > 0;
}

// ---------------------------------------------------------------- one job

const charts = {};

function setupCharts() {
  charts.loss = new LineChart($("loss-chart"), {
    series: [
      { name: "train", className: "series-loss" },
      { name: "eval", className: "series-eval", dots: true },
    ],
    emptyText: "Waiting for the first optimizer step…",
  });
  charts.lr = new LineChart($("lr-chart"), {
    series: [{ name: "lr", className: "series-lr" }],
    emptyText: "Waiting for the first optimizer step…",
  });
  const toggle = $("loss-scale");
  toggle.addEventListener("click", () => {
    const log = toggle.getAttribute("aria-pressed") !== "true";
    toggle.setAttribute("aria-pressed", String(log));
    charts.loss.setLog(log);
  });
}

function jobView(id) {
  showView("view-job");
  const view = {
    stopped: false, job: null, lastStreamId: 0, listed: new Set(), events: [],
    stream: null, stopPolling: null, timers: {},
  };
  charts.loss.reset();
  charts.lr.reset();
  $("job-title").textContent = "";
  $("job-id").textContent = id;
  $("job-summary").textContent = "";
  $("job-status").textContent = "";
  $("job-status").dataset.status = "";
  $("job-message").hidden = true;
  $("events").replaceChildren();
  $("checkpoints").replaceChildren();
  $("attempts").replaceChildren();
  $("job-facts").replaceChildren();
  $("cancel").hidden = true;
  $("pause").hidden = true;
  $("resume").hidden = true;

  // Coalesce bursts (a replayed stream holds many status and checkpoint events).
  const soon = (name, task, delay = 300) => {
    if (view.timers[name]) return;
    view.timers[name] = setTimeout(() => {
      view.timers[name] = null;
      if (!view.stopped) task();
    }, delay);
  };

  const loadJob = async () => {
    try {
      const job = await api(jobPath(id));
      if (view.stopped) return;
      view.job = job;
      renderJob(job);
      if (!view.stream) connection("live", "live");
      if (TERMINAL.has(job.status) && view.stopPolling) view.stopPolling();
    } catch (error) {
      if (view.stopped) return;
      if (error instanceof ApiError && error.status === 404) {
        stop();
        showView("view-missing");
        $("missing-text").textContent = `There is no job ${id} that you may see.`;
      } else {
        handleFailure(error);
      }
    }
  };

  const loadEvents = async () => {
    const params = new URLSearchParams({ limit: 100 });
    for (const type of LISTED_EVENTS) params.append("type", type);
    let after = 0;
    for (let page = 0; page < EVENT_PAGES; page += 1) {
      params.set("after", after);
      const result = await api(jobPath(id, `/events?${params}`));
      if (view.stopped) return;
      result.data.forEach((event) => addEvent(view, event));
      if (!result.has_more || !result.data.length) return;
      after = result.data[result.data.length - 1].id;
    }
  };

  const loadCheckpoints = async () => {
    const result = await api(jobPath(id, "/checkpoints"));
    if (!view.stopped) renderCheckpoints(id, result.data);
  };

  const loadAttempts = async () => {
    const result = await api(jobPath(id, "/attempts"));
    if (!view.stopped) renderAttempts(result.data);
  };

  const quietly = (task) => () => task().catch((error) => {
    if (!view.stopped) handleFailure(error);
  });

  const onEvent = (event) => {
    if (view.stopped || event.id <= view.lastStreamId) return; // a replay after reconnecting
    view.lastStreamId = event.id;
    if (event.type === "metrics") {
      const data = event.data;
      charts.loss.add(0, data.step, data.loss);
      if (isNumber(data.eval_loss)) charts.loss.add(1, data.step, data.eval_loss);
      charts.lr.add(0, data.step, data.lr);
      return;
    }
    addEvent(view, { ...event, created_at: event.created_at || new Date().toISOString() });
    if (event.type === "checkpoint") soon("checkpoints", quietly(loadCheckpoints), 500);
    if (event.type === "status") {
      soon("job", loadJob);
      soon("attempts", quietly(loadAttempts));
      if (TERMINAL.has(event.data.status) && view.stream) {
        // The stream ends after the terminal status; EventSource would reconnect forever.
        view.stream.close();
        view.stream = null;
        soon("checkpoints", quietly(loadCheckpoints));
      }
    }
  };

  const stop = () => {
    view.stopped = true;
    if (view.stopPolling) view.stopPolling();
    if (view.stream) view.stream.close();
    Object.values(view.timers).forEach(clearTimeout);
    $("cancel").onclick = null;
    $("pause").onclick = null;
    $("resume").onclick = null;
  };

  for (const action of ["pause", "resume"]) {
    $(action).onclick = async () => {
      $(action).disabled = true;
      $("job-message").hidden = true;
      try {
        const updated = await pauseOrResume(id, action);
        if (view.stopped) return;
        view.job = updated;
        renderJob(updated);
      } catch (error) {
        if (view.stopped) return;
        $("job-message").textContent = `Could not ${action}: ${error.message}`;
        $("job-message").hidden = false;
      } finally {
        $(action).disabled = false;
      }
    };
  }

  $("cancel").onclick = async () => {
    const job = view.job;
    if (!job) return;
    const what = job.status === "queued"
      ? "It has not started yet."
      : "It stops at its next optimizer step and keeps a checkpoint.";
    if (!window.confirm(`Cancel “${job.name || job.id}”? ${what}`)) return;
    $("cancel").disabled = true;
    $("job-message").hidden = true;
    try {
      const updated = await api(jobPath(id, "/cancel"), { method: "POST" });
      if (view.stopped) return;
      view.job = updated;
      renderJob(updated);
    } catch (error) {
      if (view.stopped) return;
      $("job-message").textContent = `Could not cancel: ${error.message}`;
      $("job-message").hidden = false;
    } finally {
      $("cancel").disabled = false;
    }
  };

  (async () => {
    await loadJob();
    if (view.stopped || !view.job) return;
    view.stopPolling = TERMINAL.has(view.job.status) ? null : poller(loadJob, { later: true });
    quietly(loadCheckpoints)();
    quietly(loadAttempts)();
    // The listed events first: they carry their times; the stream's replay of them is
    // then skipped by id, and only new ones are added, stamped on arrival.
    await quietly(loadEvents)();
    if (view.stopped) return;
    const streamPath = jobPath(id, `/events/stream?metrics_backlog=${METRICS_BACKLOG}`);
    view.stream = openEventStream(streamPath, {
      onEvent,
      onState: (state) => {
        if (view.stopped) return;
        if (state === "open") connection("live", "streaming");
        else if (state === "retrying") connection("retrying", "reconnecting…");
        else connection("live", "live");
      },
      onFatal: handleFailure,
    });
  })();

  return stop;
}

function renderJob(job) {
  document.title = `${job.name || job.id} · trainjob`;
  $("job-title").textContent = job.name || "Untitled job";
  $("job-id").textContent = job.id;
  $("job-summary").textContent = modelSummary(job.spec);
  const status = $("job-status");
  status.textContent = job.status;
  status.dataset.status = job.status;
  const cancel = $("cancel");
  cancel.hidden = !(CANCELLABLE.has(job.status) || job.status === "cancelling");
  cancel.disabled = job.status === "cancelling";
  cancel.textContent = job.status === "cancelling" ? "Cancelling…" : "Cancel job";
  $("pause").hidden = !(PAUSABLE.has(job.status) || job.status === "pausing");
  $("pause").disabled = job.status === "pausing";
  $("pause").textContent = job.status === "pausing" ? "Pausing…" : "Pause";
  $("resume").hidden = !RESUMABLE.has(job.status);

  const { fraction, text } = progressOf(job);
  const fill = $("job-bar");
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  fill.dataset.status = job.status;
  $("job-progress-text").textContent = `${text}  ·  ${(fraction * 100).toFixed(0)}%`;
  if (job.progress.max_steps) {
    charts.loss.setXMax(job.progress.max_steps);
    charts.lr.setXMax(job.progress.max_steps);
  }

  const metrics = job.metrics || {};
  const live = ["running", "cancelling", "pausing"].includes(job.status);
  const facts = [
    ["Loss", fmtLoss(metrics.loss)],
    // Evaluations are every few steps: the latest one, not only the latest step's.
    ["Eval loss", fmtLoss(isNumber(metrics.eval_loss) ? metrics.eval_loss : charts.loss.last(1))],
    ["Learning rate", isNumber(metrics.lr) ? formatNumber(metrics.lr) : "–"],
    ["Samples/s", live ? fmtRate(metrics.samples_per_sec) : "–"],
    ["Batch", batchCell(job)],
    ["Epoch", fmtInt(job.progress.epoch)],
    ["Samples seen", fmtInt(job.progress.samples_seen)],
    ["Runtime", fmtDuration(job.runtime_seconds)],
    ["Priority", fmtInt(job.priority)],
    ...(isNumber(job.queue_position)
      ? [["Queue position", job.queue_position === 0 ? "next" : `${fmtInt(job.queue_position)} before it`]]
      : []),
    ...(job.estimated_finish
      ? [["Estimated finish", fmtDateTime(job.estimated_finish)]] : []),
    ["Attempts", `${job.attempts} of ${job.max_attempts}`],
    ["Worker", job.worker || "–"],
    ["Created", fmtDateTime(job.created_at)],
    ["Finished", fmtDateTime(job.finished_at)],
  ];
  if (job.progress.tokens_seen) {
    facts.splice(7, 0, ["Tokens seen", fmtInt(job.progress.tokens_seen)]);
  }
  $("job-facts").replaceChildren(...facts.map(([label, value]) => el("div", { class: "fact" },
    el("dt", {}, label),
    el("dd", {
      class: label === "Worker" ? "mono" : null,
      title: typeof value === "string" ? value : null,
    }, value))));
  if (job.error) {
    $("job-message").textContent = `${job.error.type}: ${job.error.message}`;
    $("job-message").hidden = false;
  }
  $("job-spec").textContent = JSON.stringify(job.spec, null, 2);
}

function eventSummary(event) {
  const data = event.data || {};
  switch (event.type) {
    case "status": {
      const parts = [data.status];
      if (data.reason) parts.push(`(${data.reason})`);
      if (data.worker) parts.push(`on ${data.worker}`);
      if (data.resumed_from_step) parts.push(`from step ${fmtInt(data.resumed_from_step)}`);
      if (data.error) parts.push(`— ${data.error.type}: ${data.error.message}`);
      return parts.join(" ");
    }
    case "checkpoint": {
      const parts = [`step ${fmtInt(data.step)}`];
      if (isNumber(data.size_bytes)) parts.push(fmtBytes(data.size_bytes));
      if (isNumber(data.eval_loss)) parts.push(`eval loss ${fmtLoss(data.eval_loss)}`);
      return parts.join(" · ");
    }
    case "oom_backoff":
      return `out of memory at step ${fmtInt(data.step)}: `
        + `micro-batch ${data.old_micro_batch_size} → ${data.new_micro_batch_size}`;
    case "overflow_skip":
      return `step ${fmtInt(data.step)} skipped (fp16 overflow), `
        + `loss scale ${formatNumber(data.scale)}`;
    case "error":
      return `${data.type || "error"}: ${data.message || ""}`;
    default:
      return data.message || JSON.stringify(data);
  }
}

function addEvent(view, event) {
  if (view.listed.has(event.id)) return;
  view.listed.add(event.id);
  const item = el("li", { class: "event", "data-event-id": event.id, "data-type": event.type },
    el("time", {
      class: "event-time mono", datetime: event.created_at, title: fmtDateTime(event.created_at),
    }, fmtClock(event.created_at)),
    el("span", { class: "event-type", "data-type": event.type }, event.type.replace("_", " ")),
    el("span", { class: "event-text" }, eventSummary(event)));
  // Newest first; ids rise with time, so find the place by id.
  const list = $("events");
  const after = [...list.children].find((node) => Number(node.dataset.eventId) < event.id);
  list.insertBefore(item, after || null);
  $("events-count").textContent = `${view.listed.size}`;
}

function renderCheckpoints(jobId, checkpoints) {
  const newestFirst = [...checkpoints].sort((a, b) => b.step - a.step);
  $("checkpoints").replaceChildren(...newestFirst.map((checkpoint) => {
    const href = jobPath(jobId, `/weights?step=${encodeURIComponent(checkpoint.step)}`);
    const filename = `${jobId}-step${checkpoint.step}.safetensors`;
    const link = el("a", { href, download: filename, class: "download" }, "Download");
    link.addEventListener("click", (event) => downloadWithKey(event, href, filename));
    return el("tr", { "data-step": checkpoint.step },
      el("td", { class: "num" }, fmtInt(checkpoint.step)),
      el("td", { class: "num" }, fmtLoss(checkpoint.loss)),
      el("td", { class: "num eval-loss" }, fmtLoss(checkpoint.eval_loss)),
      el("td", { class: "num" }, fmtBytes(checkpoint.size_bytes)),
      el("td", { title: fmtDateTime(checkpoint.created_at) }, fmtClock(checkpoint.created_at)),
      el("td", { class: "right" }, link));
  }));
  $("checkpoints-empty").hidden = checkpoints.length > 0;
  $("checkpoints-table").hidden = checkpoints.length === 0;
}

// A link cannot send the Authorization header: with a key, fetch the bytes instead.
async function downloadWithKey(event, href, filename) {
  if (!apiKey()) return;
  event.preventDefault();
  const response = await fetch(href, { headers: { authorization: `Bearer ${apiKey()}` } });
  if (!response.ok) {
    const message = `download failed: HTTP ${response.status}`;
    handleFailure(new ApiError(response.status, "download", message));
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const anchor = el("a", { href: url, download: filename });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function renderAttempts(attempts) {
  $("attempts").replaceChildren(...attempts.map(attemptRow));
  $("attempts-empty").hidden = attempts.length > 0;
  $("attempts-table").hidden = attempts.length === 0;
}

function attemptRow(attempt) {
  const running = el("span", { class: "muted" }, "running");
  const ended = attempt.reason ? outcome(attempt.reason) : running;
  const uncounted = attempt.counted ? null : el("span", { class: "muted small" }, " not counted");
  return el("tr", { "data-attempt": attempt.attempt },
    el("td", { class: "num" }, attempt.attempt),
    el("td", { class: "mono ellipsis", title: attempt.worker }, attempt.worker),
    el("td", { title: fmtDateTime(attempt.started_at) }, fmtClock(attempt.started_at)),
    el("td", { title: fmtDateTime(attempt.ended_at) }, fmtClock(attempt.ended_at)),
    el("td", { class: "num" }, fmtInt(attempt.resumed_from_step)),
    el("td", {}, ended, uncounted));
}

// How a run ended: a status badge, or the reason (shutdown, worker lost, nan loss, ...).
function outcome(reason) {
  if (STATUSES.includes(reason)) return badge(reason);
  return el("span", { class: "reason" }, reason.replace(/_/g, " "));
}

// ---------------------------------------------------------------- routing

let stopCurrent = null;

function route() {
  if (stopCurrent) stopCurrent();
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, search] = hash.split("?");
  const job = path.match(/^\/jobs\/([^/]+)$/);
  $("nav-jobs").classList.toggle("active", !job);
  if (job) {
    stopCurrent = jobView(decodeURIComponent(job[1]));
  } else {
    const status = new URLSearchParams(search || "").get("status");
    stopCurrent = overviewView(STATUSES.includes(status) ? status : null);
  }
}

setupKeyForm();
setupCharts();
window.addEventListener("hashchange", route);
route();
