// The sna dashboard: polls the daemon's JSON API and draws what it answers.
//
// No framework and no build step.  Every text from the API goes into the page
// with textContent or an attribute, never as HTML.  When the daemon has an API
// token, the page asks for it on the first 401, keeps it in sessionStorage (this
// tab only) and sends it as the Authorization header of every call; it never
// puts it in a URL or a cookie.
"use strict";

(() => {
  const POLL_MS = 1500;
  const HIDDEN_POLL_MS = 10000;
  // History, relays and health change slowly: every SLOW_EVERY polls.
  const SLOW_EVERY = 3;
  const HISTORY_LIMIT = 20;
  // A job that ends while the page watches stays in "Running jobs" this long, finished.
  const FINISHED_KEEP_MS = 120000;
  const LOG_WAIT_SECONDS = 10;
  const LOG_MAX_LINES = 5000;
  const TOKEN_KEY = "sna.api-token";
  const SVG = "http://www.w3.org/2000/svg";
  const KIB = 1024;
  const MIB = KIB * 1024;
  const ACTIVE = new Set(["running"]);

  const $ = (id) => document.getElementById(id);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    locked: false,
    polls: 0,
    timer: null,
    cards: new Map(), // job_id -> {element, parts, ended: ms or null}
    selected: null, // job_id shown in the drawer
    logAbort: null,
    relayColours: new Map(), // nbd_port -> colour index
    historyAvailable: true,
  };

  // -- the API --------------------------------------------------------------

  class Unauthorized extends Error {}

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.code = body && body.error;
    }
  }

  async function api(path, signal) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const response = await fetch(path, {
      headers,
      signal,
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
    if (response.status === 401) throw new Unauthorized();
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  const jobPath = (jobId) => encodeURIComponent(jobId);

  // -- formatting -----------------------------------------------------------

  function bytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = n;
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    if (unit === 0) return `${value} B`;
    return `${value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2)} ${units[unit]}`;
  }

  function rate(bps) {
    if (bps === null || bps === undefined || !isFinite(bps)) return "—";
    if (bps === 0) return "0 B/s";
    if (bps < MIB) return `${(bps / KIB).toFixed(bps >= 100 * KIB ? 0 : 1)} KiB/s`;
    const mib = bps / MIB;
    return `${mib.toFixed(mib >= 100 ? 0 : mib >= 10 ? 1 : 2)} MiB/s`;
  }

  function clock(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) return "—";
    const whole = Math.round(seconds);
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    const s = whole % 60;
    return `${h}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}`;
  }

  function when(text) {
    if (!text) return "—";
    const date = new Date(text);
    if (isNaN(date)) return text;
    const time = date.toLocaleTimeString([], { hour12: false });
    const today = new Date().toDateString() === date.toDateString();
    return today ? time : `${date.toLocaleDateString()} ${time}`;
  }

  function percent(value) {
    if (value === null || value === undefined || !isFinite(value)) return 0;
    return Math.max(0, Math.min(100, value));
  }

  function seconds(from, to) {
    if (!from) return null;
    const start = Date.parse(from);
    const end = to ? Date.parse(to) : Date.now();
    return isNaN(start) || isNaN(end) ? null : Math.max(0, (end - start) / 1000);
  }

  // The job's sync type as its disks have it: full, incremental or mixed.
  function syncType(job) {
    const types = new Set((job.disks || []).map((d) => d.sync_type).filter(Boolean));
    if (types.size === 0) return job.backup_type || "";
    if (types.size > 1) return "mixed";
    return [...types][0];
  }

  // -- small DOM helpers ------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function badge(text, kind) {
    return el("span", `badge ${kind || text}`, text);
  }

  function bar(big) {
    const outer = el("div", big ? "bar big" : "bar");
    outer.setAttribute("role", "progressbar");
    outer.setAttribute("aria-valuemin", "0");
    outer.setAttribute("aria-valuemax", "100");
    outer.setAttribute("aria-valuenow", "0");
    outer.append(el("div", "fill"));
    return outer;
  }

  function setBar(outer, value) {
    const v = percent(value);
    const text = v.toFixed(1);
    if (outer.getAttribute("aria-valuenow") !== text) {
      outer.setAttribute("aria-valuenow", text);
      // CSSOM, not a style attribute: the page's CSP allows no inline style.
      outer.firstChild.style.width = `${v}%`;
    }
  }

  // -- the connection and the token -------------------------------------------

  function connection(kind, text) {
    const node = $("connection");
    node.dataset.state = kind;
    setText(node, text);
  }

  function askForToken(refused) {
    state.locked = true;
    stopLog();
    clearTimeout(state.timer);
    connection("locked", "token needed");
    $("token-dialog").hidden = false;
    const error = $("token-error");
    error.hidden = !refused;
    setText(error, refused ? "The daemon refused that token." : "");
    $("token-input").value = "";
    $("token-input").focus();
  }

  function useToken(event) {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token-input").value = "";
    $("token-dialog").hidden = true;
    $("forget-token").hidden = false;
    state.locked = false;
    state.refusedOnce = true; // a 401 now means this token was refused
    state.polls = 0;
    poll();
    if (state.selected) openJob(state.selected);
  }

  function forgetToken() {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("forget-token").hidden = true;
    askForToken(false);
  }

  function failed(error) {
    if (error instanceof Unauthorized) {
      const refused = Boolean(state.token) && state.refusedOnce;
      if (state.token) {
        state.token = null;
        sessionStorage.removeItem(TOKEN_KEY);
      }
      askForToken(refused);
      return true;
    }
    return false;
  }

  // -- polling ------------------------------------------------------------------

  async function poll() {
    clearTimeout(state.timer);
    if (state.locked) return;
    const slow = state.polls % SLOW_EVERY === 0;
    state.polls += 1;
    try {
      const work = [refreshRunning()];
      if (slow) work.push(refreshHealth(), refreshHistory(), refreshRelays());
      await Promise.all(work);
      state.refusedOnce = false;
      connection("live", `live · updated ${new Date().toLocaleTimeString([], { hour12: false })}`);
    } catch (error) {
      if (failed(error)) return;
      connection("lost", error instanceof ApiError ? error.message : "daemon unreachable, retrying");
    }
    state.timer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  async function refreshHealth() {
    const health = await api("/api/v1/health");
    setText($("health-status"), health.status + (health.reason ? `: ${health.reason}` : ""));
    $("health-status").className = health.status === "healthy" ? "" : "bad";
    setText($("health-version"), health.version);
    setText($("health-uptime"), clock(health.uptime_seconds));
    state.maxJobs = health.max_jobs;
    setText($("health-running"), `${health.running_jobs} of ${health.max_jobs}`);
    const tunnel = health.tunnel || {};
    $("health-tunnel-row").hidden = !tunnel.configured;
    if (tunnel.configured) {
      setText($("health-tunnel"), tunnel.state + (tunnel.reason ? `: ${tunnel.reason}` : ""));
      $("health-tunnel").className = tunnel.state === "up" ? "" : "bad";
    }
    $("health-snapshots-row").hidden = !health.snapshots_pending;
    setText($("health-snapshots"), String(health.snapshots_pending || 0));
  }

  // -- running jobs ---------------------------------------------------------------

  async function refreshRunning() {
    const answer = await api("/api/v1/jobs?status=running");
    const jobs = answer.jobs || [];
    const seen = new Set();
    for (const job of jobs) {
      seen.add(job.job_id);
      showCard(job);
    }
    // Jobs that left the running list: show how they ended, then let them go.
    const ended = [];
    for (const [jobId, card] of state.cards) {
      if (seen.has(jobId)) continue;
      if (card.ended === null) {
        card.ended = Date.now();
        ended.push(jobId);
      } else if (Date.now() - card.ended > FINISHED_KEEP_MS) {
        card.element.remove();
        state.cards.delete(jobId);
      }
    }
    await Promise.all(
      ended.map(async (jobId) => {
        try {
          showCard(await api(`/api/v1/status/${jobPath(jobId)}`));
        } catch (error) {
          if (error instanceof Unauthorized) throw error;
          state.cards.get(jobId)?.element.remove();
          state.cards.delete(jobId);
        }
      }),
    );
    if (ended.length) state.polls = 0; // a job ended: refresh the history now
    setText($("running-count"), jobs.length ? `(${jobs.length})` : "");
    if (state.maxJobs) setText($("health-running"), `${jobs.length} of ${state.maxJobs}`);
    $("running-empty").hidden = state.cards.size > 0;
  }

  // Seconds left: the daemon's own estimate when it gives one (eta_seconds); else
  // by bytes at the current rate when the total is known, else by the share done
  // so far in the time taken.
  function eta(job, elapsed) {
    if (typeof job.eta_seconds === "number") return job.eta_seconds;
    const done = job.bytes_done || 0;
    const total = job.bytes_total;
    const speed = job.throughput_bps;
    if (total > done && speed > 0) return (total - done) / speed;
    const share = job.progress_percent;
    if (share > 0 && share < 100 && elapsed > 0) return (elapsed * (100 - share)) / share;
    return null;
  }

  function newCard(job) {
    const element = el("article", "job");
    element.dataset.jobId = job.job_id;
    element.tabIndex = 0;
    const head = el("div", "job-head");
    const parts = {
      vm: el("span", "vm"),
      jobId: el("span", "job-id mono small"),
      type: el("span"),
      status: el("span"),
      stalled: badge("stalled"),
      spacer: el("span", "spacer"),
      overall: bar(true),
      pct: el("div", "pct"),
      figures: el("div", "job-figures"),
      operation: el("div", "job-operation"),
      stall: el("div", "stall"),
      error: el("div", "job-error"),
      disks: el("table", "disks"),
      diskRows: new Map(),
    };
    parts.stalled.hidden = true;
    head.append(parts.vm, parts.type, parts.stalled, parts.spacer, parts.status, parts.jobId);
    const overall = el("div", "overall");
    overall.append(parts.overall, parts.pct);
    parts.figureCells = {};
    for (const [key, label] of [
      ["bytes", "copied"],
      ["rate", "rate"],
      ["eta", "ETA"],
      ["elapsed", "elapsed"],
      ["started", "started"],
    ]) {
      const cell = el("div");
      cell.append(el("span", null, label), el("b"));
      cell.dataset.figure = key;
      parts.figureCells[key] = cell.lastChild;
      parts.figureLabels = parts.figureLabels || {};
      parts.figureLabels[key] = cell.firstChild;
      parts.figures.append(cell);
    }
    parts.disks.append(el("tbody"));
    element.append(head, overall, parts.figures, parts.operation, parts.disks, parts.stall, parts.error);
    element.addEventListener("click", () => openJob(job.job_id));
    element.addEventListener("keydown", (event) => {
      if (event.key === "Enter") openJob(job.job_id);
    });
    $("running").append(element);
    const card = { element, parts, ended: null };
    state.cards.set(job.job_id, card);
    return card;
  }

  function showCard(job) {
    const card = state.cards.get(job.job_id) || newCard(job);
    const { element, parts } = card;
    const active = ACTIVE.has(job.status);
    if (active) card.ended = null;
    element.dataset.status = job.status;
    element.classList.toggle("stalled", Boolean(job.stalled) && active);
    setText(parts.vm, job.vm_name || job.vm_path || job.job_id);
    setText(parts.jobId, job.job_id);
    const sync = syncType(job);
    setText(parts.type, sync);
    parts.type.className = `badge ${sync}`;
    const statusText = active ? job.phase || job.status : job.status;
    setText(parts.status, statusText);
    parts.status.className = `badge result ${job.status}`;
    parts.stalled.hidden = !(job.stalled && active);

    setBar(parts.overall, job.progress_percent);
    setText(parts.pct, `${percent(job.progress_percent).toFixed(1)} %`);
    const done = job.bytes_done || 0;
    const total = job.bytes_total;
    setText(parts.figureCells.bytes, total ? `${bytes(done)} of ${bytes(total)}` : bytes(done));
    const elapsed = seconds(job.start_time, job.end_time);
    if (active) {
      setText(parts.figureLabels.rate, "rate");
      setText(parts.figureCells.rate, rate(job.throughput_bps));
    } else {
      const duration = job.duration_seconds ?? elapsed;
      const average = job.average_rate_bps ?? (duration > 0 ? done / duration : null);
      setText(parts.figureLabels.rate, "average");
      setText(parts.figureCells.rate, rate(average));
    }
    setText(parts.figureCells.eta, active ? clock(eta(job, elapsed)) : "—");
    setText(parts.figureCells.elapsed, clock(elapsed));
    setText(parts.figureCells.started, when(job.start_time));
    setText(parts.operation, job.current_operation || "");

    if (job.stalled && active) {
      const s = job.stalled;
      setText(
        parts.stall,
        `No progress since ${when(s.since)} (waiting on ${s.on}` +
          (s.disk_key ? `, disk ${s.disk_key}` : "") +
          `)${s.message ? `: ${s.message}` : ""}`,
      );
    } else {
      setText(parts.stall, "");
    }
    setText(parts.error, job.error || "");
    showDisks(parts, job.disks || []);
  }

  function showDisks(parts, disks) {
    const body = parts.disks.tBodies[0];
    for (const disk of disks) {
      const key = String(disk.target_key || disk.disk_key);
      let row = parts.diskRows.get(key);
      if (!row) {
        const tr = el("tr", "disk");
        tr.dataset.diskKey = key;
        row = {
          tr,
          key: el("td", "key mono"),
          sync: el("td"),
          barcell: el("td", "barcell"),
          pct: el("td", "num"),
          bytes: el("td", "num"),
          status: el("td"),
        };
        row.bar = bar(false);
        row.barcell.append(row.bar);
        tr.append(row.key, row.sync, row.barcell, row.pct, row.bytes, row.status);
        body.append(tr);
        parts.diskRows.set(key, row);
      }
      const total = disk.bytes_total;
      const done = disk.bytes_done || 0;
      let value = total ? (100 * done) / total : 0;
      if (disk.status === "completed") value = 100;
      row.tr.dataset.status = disk.status || "";
      setText(row.key, `disk ${disk.disk_key}`);
      row.sync.replaceChildren(disk.sync_type ? badge(disk.sync_type) : el("span"));
      if (disk.sync_reason) row.sync.title = disk.sync_reason;
      setBar(row.bar, value);
      setText(row.pct, `${percent(value).toFixed(1)} %`);
      setText(row.bytes, total ? `${bytes(done)} / ${bytes(total)}` : bytes(done));
      setText(row.status, disk.target_error ? `${disk.status}: ${disk.target_error}` : disk.status);
    }
  }

  // -- relay throughput -------------------------------------------------------------

  async function refreshRelays() {
    if (!state.historyAvailable) return;
    let history;
    try {
      history = await api("/api/v1/relays/history");
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        state.historyAvailable = false;
        $("relays-unavailable").hidden = false;
        $("relay-chart").replaceChildren();
        return;
      }
      throw error;
    }
    drawRelays(history);
  }

  function colourOf(port) {
    if (!state.relayColours.has(port)) {
      const used = new Set(state.relayColours.values());
      let index = 0;
      while (used.has(index) && index < 8) index += 1;
      state.relayColours.set(port, index % 8);
    }
    return state.relayColours.get(port);
  }

  // A round top for the chart, in the unit its labels use (KiB/s or MiB/s).
  function niceCeiling(bps) {
    if (bps <= 0) return MIB;
    if (bps > 512 * KIB && bps <= MIB) return MIB;
    const unit = bps < MIB ? KIB : MIB;
    const value = bps / unit;
    const exponent = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * exponent) return step * exponent * unit;
    }
    return 10 * exponent * unit;
  }

  function drawRelays(history) {
    const span = history.window_seconds || 600;
    setText(
      $("relay-window"),
      `last ${Math.round(span / 60)} min, one point every ${history.interval_seconds} s`,
    );
    const chart = $("relay-chart");
    const width = 760;
    const height = 200;
    const left = 78;
    const bottom = 22;
    const top = 8;
    const plotW = width - left - 8;
    const plotH = height - top - bottom;
    const end = history.sampled_at ? Date.parse(history.sampled_at) : Date.now();
    const ports = history.ports || [];
    let peak = 0;
    for (const port of ports) {
      for (const s of port.samples) peak = Math.max(peak, s.throughput_bps);
    }
    const top_ = niceCeiling(peak);
    const x = (time) => left + plotW * (1 - Math.min(span, Math.max(0, (end - time) / 1000)) / span);
    const y = (bps) => top + plotH * (1 - bps / top_);

    const nodes = [];
    for (const fraction of [0, 0.5, 1]) {
      const yy = top + plotH * (1 - fraction);
      nodes.push(svg("line", { class: "grid", x1: left, x2: width - 8, y1: yy, y2: yy }));
      const label = svg("text", { class: "axis", x: left - 6, y: yy + 4, "text-anchor": "end" });
      label.textContent = fraction === 0 ? "0" : rate(top_ * fraction);
      nodes.push(label);
    }
    for (const [fraction, text] of [
      [0, `-${Math.round(span / 60)} min`],
      [0.5, `-${Math.round(span / 120)} min`],
      [1, "now"],
    ]) {
      const label = svg("text", {
        class: "axis",
        x: left + plotW * fraction,
        y: height - 6,
        "text-anchor": fraction === 0 ? "start" : fraction === 1 ? "end" : "middle",
      });
      label.textContent = text;
      nodes.push(label);
    }

    const legend = [];
    for (const port of ports) {
      const colour = `s${colourOf(port.nbd_port)}`;
      const points = [];
      for (const s of port.samples) {
        const t = Date.parse(s.time);
        // Each sample is a rate over the span that ends at its time: a step.
        points.push([x(t - s.seconds * 1000), y(s.throughput_bps)]);
        points.push([x(t), y(s.throughput_bps)]);
      }
      if (points.length) {
        const text = points.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" ");
        const base = y(0).toFixed(1);
        const area = svg("polygon", {
          class: `area ${colour}`,
          points: `${points[0][0].toFixed(1)},${base} ${text} ${points[points.length - 1][0].toFixed(1)},${base}`,
        });
        const line = svg("polyline", { class: `series ${colour}`, points: text });
        line.dataset.port = port.nbd_port;
        nodes.push(area, line);
      }
      const last = port.samples.length ? port.samples[port.samples.length - 1].throughput_bps : 0;
      const high = Math.max(0, ...port.samples.map((s) => s.throughput_bps));
      const item = el("li", port.active ? "" : "idle");
      item.dataset.port = port.nbd_port;
      const who = el("span", "who");
      who.append(el("b", null, `port ${port.nbd_port}`), ` ${port.export || ""}`);
      who.title = port.job_id ? `job ${port.job_id}` : "";
      const now = port.active ? rate(last) : "idle";
      item.append(el("span", `swatch ${colour}`), who, el("span", "rate", `${now} · peak ${rate(high)}`));
      legend.push(item);
    }
    chart.replaceChildren(...nodes);
    $("relay-legend").replaceChildren(...legend);
    $("relays-empty").hidden = ports.length > 0;
    // Colours of ports no longer shown are free again.
    const shown = new Set(ports.map((p) => p.nbd_port));
    for (const port of [...state.relayColours.keys()]) {
      if (!shown.has(port)) state.relayColours.delete(port);
    }
  }

  // -- recent jobs ----------------------------------------------------------------------

  async function refreshHistory() {
    const answer = await api(`/api/v1/jobs?limit=${HISTORY_LIMIT}`);
    const jobs = (answer.jobs || []).filter((job) => !ACTIVE.has(job.status)).slice(0, HISTORY_LIMIT);
    const rows = jobs.map(historyRow);
    $("history-rows").replaceChildren(...rows);
    $("history-empty").hidden = rows.length > 0;
  }

  function historyRow(job) {
    const tr = el("tr");
    tr.dataset.jobId = job.job_id;
    tr.dataset.status = job.status;
    tr.tabIndex = 0;
    if (job.job_id === state.selected) tr.classList.add("selected");
    // duration_seconds and average_rate_bps come with paging; worked out here until then.
    const duration = job.duration_seconds ?? seconds(job.start_time, job.end_time);
    const done = job.bytes_done || 0;
    const average = job.average_rate_bps ?? (duration > 0 ? done / duration : null);

    const started = el("td", null, when(job.start_time));
    const vm = el("td");
    vm.append(el("div", "vm", job.vm_name || job.vm_path || ""), el("div", "sub mono", job.job_id));
    const type = el("td");
    const sync = syncType(job);
    if (sync) type.append(badge(sync));
    const result = el("td");
    result.append(badge(job.status, `result ${job.status}`));
    if (job.error) result.append(el("div", "why", job.error));
    tr.append(
      started,
      vm,
      type,
      el("td", "num", clock(duration)),
      el("td", "num", bytes(done)),
      el("td", "num", rate(average)),
      result,
    );
    tr.addEventListener("click", () => openJob(job.job_id));
    tr.addEventListener("keydown", (event) => {
      if (event.key === "Enter") openJob(job.job_id);
    });
    return tr;
  }

  // -- one job: its details and its log -------------------------------------------------

  function stopLog() {
    if (state.logAbort) state.logAbort.abort();
    state.logAbort = null;
  }

  function closeJob() {
    stopLog();
    state.selected = null;
    $("log-panel").hidden = true;
    for (const row of document.querySelectorAll("#history-rows tr.selected")) {
      row.classList.remove("selected");
    }
  }

  async function openJob(jobId) {
    stopLog();
    state.selected = jobId;
    for (const row of document.querySelectorAll("#history-rows tr")) {
      row.classList.toggle("selected", row.dataset.jobId === jobId);
    }
    $("log-panel").hidden = false;
    $("log-panel").dataset.jobId = jobId;
    setText($("log-job-id"), jobId);
    setText($("log-title"), "Job");
    $("log-detail").replaceChildren();
    $("log-lines").replaceChildren();
    setText($("log-state"), "");
    const abort = new AbortController();
    state.logAbort = abort;
    try {
      const job = await api(`/api/v1/status/${jobPath(jobId)}`, abort.signal);
      if (abort.signal.aborted) return;
      showDetail(job);
    } catch (error) {
      if (abort.signal.aborted || failed(error)) return;
      setText($("log-state"), error.message);
      return;
    }
    followLog(jobId, abort.signal);
  }

  function showDetail(job) {
    setText($("log-title"), job.vm_name || job.vm_path || "Job");
    const list = el("dl");
    const duration = job.duration_seconds ?? seconds(job.start_time, job.end_time);
    const items = [
      ["status", job.status + (job.exit_code !== null && job.exit_code !== undefined ? ` (exit ${job.exit_code})` : "")],
      ["type", `${job.backup_type || "?"} requested, disks ${syncType(job) || "?"}`],
      ["vm path", job.vm_path],
      ["started", when(job.start_time)],
      ["ended", when(job.end_time)],
      ["duration", clock(duration)],
      ["copied", job.bytes_total ? `${bytes(job.bytes_done)} of ${bytes(job.bytes_total)}` : bytes(job.bytes_done)],
    ];
    if (job.error) items.push(["error", job.error]);
    if (job.snapshot) items.push(["snapshot", `${job.snapshot.name} (${job.snapshot.state})`]);
    for (const disk of job.disks || []) {
      items.push([
        `disk ${disk.disk_key}`,
        `${disk.status} · ${disk.sync_type || "?"} · ${bytes(disk.bytes_done)}` +
          (disk.change_id ? ` · change ID ${disk.change_id}` : ""),
      ]);
    }
    for (const [name, value] of items) {
      list.append(el("dt", null, name), el("dd", null, value ?? "—"));
    }
    $("log-detail").replaceChildren(list);
  }

  async function followLog(jobId, signal) {
    const out = $("log-lines");
    // No offset at first: the daemon starts at this job's own lines (an earlier
    // job of the same id may have written to the same file).
    let offset = null;
    let wait = LOG_WAIT_SECONDS;
    setText($("log-state"), "loading…");
    while (!signal.aborted) {
      let answer;
      try {
        const query = [];
        if (offset !== null) query.push(`offset=${offset}`);
        if (wait) query.push(`wait=${wait}`);
        const suffix = query.length ? `?${query.join("&")}` : "";
        answer = await api(`/api/v1/jobs/${jobPath(jobId)}/log${suffix}`, signal);
      } catch (error) {
        if (signal.aborted || failed(error)) return;
        if (error instanceof ApiError && error.status === 404 && error.code === "not_found") {
          setText($("log-state"), "this daemon does not serve job logs");
          return;
        }
        if (error instanceof ApiError && error.status === 410) {
          setText($("log-state"), error.message);
          return;
        }
        if (error instanceof ApiError && (error.status === 400 || error.status === 503) && wait) {
          wait = 0; // no long poll to be had (too many waiting): poll instead
          continue;
        }
        if (error instanceof ApiError && error.status === 400) {
          setText($("log-state"), error.message);
          return;
        }
        setText($("log-state"), error.message || "cannot read the log; retrying");
        await new Promise((resolve) => setTimeout(resolve, 3000));
        continue;
      }
      const lines = answer.lines || [];
      if (lines.length) {
        const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
        const text = lines.map((line) => (typeof line === "string" ? line : JSON.stringify(line)));
        out.append(document.createTextNode(text.join("\n") + "\n"));
        while (out.childNodes.length > 1 && out.textContent.split("\n").length > LOG_MAX_LINES) {
          out.firstChild.remove();
        }
        if (stick) out.scrollTop = out.scrollHeight;
      }
      offset = answer.next_offset ?? offset;
      if (answer.complete) {
        setText($("log-state"), "complete");
        return;
      }
      setText($("log-state"), "following");
      if (!wait) await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  // -- start ---------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", useToken);
    $("forget-token").addEventListener("click", forgetToken);
    $("forget-token").hidden = !state.token;
    $("log-close").addEventListener("click", closeJob);
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !$("log-panel").hidden) closeJob();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !state.locked) poll();
    });
    poll();
  });
})();
