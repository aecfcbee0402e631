// The meterline dashboard: reads the admin API (/api/v1/analytics/*, /api/v1/budgets)
// every REFRESH_MS and draws tiles, Chart.js charts and tables: traffic and spend, then
// agents and MCP (analytics/agents), then guardrails (analytics/guardrails). Plain script, no build
// step: the daemon serves this file as it is. body[data-state] and body[data-refreshes]
// say when a refresh has landed (for people, and for the browser tests).
"use strict";

(() => {
  const REFRESH_MS = 10000;
  const TOKEN_KEY = "meterline.adminToken";
  const MAX_SERIES = 8; // providers drawn one by one; the rest are "other"
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
                   "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const state = {
    range: params.get("range") || "30d",
    provider: params.get("provider") || "all",
    breakdown: "provider",
    busy: false,
    again: false,
  };
  const charts = {};
  const tables = {}; // table id -> {columns, rows}: what is shown, for the CSV download
  const colours = new Map(); // provider -> colour, stable across refreshes

  // --- the token ------------------------------------------------------------------------
  // ?token= is moved to local storage and out of the address bar, so that it is not left
  // in the history, in bookmarks or on screen.
  if (params.has("token")) {
    localStorage.setItem(TOKEN_KEY, params.get("token"));
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.size ? `?${params}` : ""));
  }
  const token = () => localStorage.getItem(TOKEN_KEY);

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, query = {}) {
    const url = new URL(`api/v1/${path}`, document.baseURI);
    for (const [k, v] of Object.entries(query)) {
      if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
    }
    const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
    const response = await fetch(url, { headers, cache: "no-store" });
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error || message; } catch { /* not JSON */ }
      throw new ApiError(response.status, message);
    }
    return response.json();
  }

  // --- formatting -------------------------------------------------------------------------
  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const decimal = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });
  const few = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 3 });
  const dollars = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
  const cents = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD",
                                                 maximumSignificantDigits: 2 });
  const dash = "–";
  const count = (x) => (x == null ? dash : Number.isInteger(x) ? integer.format(x) : decimal.format(x));
  const usd = (x) => (x == null ? dash : x !== 0 && Math.abs(x) < 0.01 ? cents.format(x) : dollars.format(x));
  const pct = (x) => (x == null ? dash : `${(x * 100).toFixed(1)}%`);
  const ms = (x) => (x == null ? dash : `${integer.format(x)} ms`);
  const label = (x) => (x == null || x === "" ? "(not reported)" : String(x));

  function timeLabel(iso, hourly) {
    const options = hourly ? { hour: "2-digit", minute: "2-digit", hourCycle: "h23" }
                           : { month: "short", day: "numeric" };
    return new Date(iso).toLocaleString("en-US", { ...options, timeZone: "UTC" });
  }

  function colour(provider) {
    if (!colours.has(provider)) colours.set(provider, PALETTE[colours.size % PALETTE.length]);
    return colours.get(provider);
  }

  // --- notices ----------------------------------------------------------------------------
  function notice(text, isError = false) {
    const el = $("notice");
    el.hidden = !text;
    el.textContent = text || "";
    el.classList.toggle("error", isError);
  }

  function showContent(visible) {
    $("content").hidden = !visible;
  }

  // --- tables and CSV ---------------------------------------------------------------------
  // A column: {title, value(row) -> the raw value (what the CSV holds), format(value) ->
  // its text (default: label), numeric (right-aligned), meter (a 0..1 bar),
  // className(row) (a class for the cell)}.
  function renderTable(id, columns, rows, empty) {
    tables[id] = { columns, rows };
    const table = $(id);
    table.replaceChildren();
    const head = table.createTHead().insertRow();
    for (const c of columns) {
      const th = document.createElement("th");
      th.textContent = c.title;
      if (c.numeric) th.className = "num";
      head.append(th);
    }
    const body = table.createTBody();
    if (!rows.length) {
      const td = body.insertRow().insertCell();
      td.colSpan = columns.length;
      td.className = "empty";
      td.textContent = empty;
      return;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      for (const c of columns) {
        const td = tr.insertCell();
        const value = c.value(row);
        if (c.numeric) td.className = "num";
        if (c.className) td.classList.add(c.className(row));
        if (c.meter) {
          const meter = document.createElement("meter");
          meter.min = 0;
          meter.max = 1;
          meter.low = 0.8;
          meter.high = 0.999;
          meter.optimum = 0;
          meter.value = Math.min(value ?? 0, 1);
          td.append(meter, ` ${pct(value)}`);
        } else {
          td.textContent = (c.format || label)(value);
        }
      }
    }
  }

  function csvCell(value) {
    if (value == null) return "";
    let text = String(value);
    // A spreadsheet runs a cell starting with = + - @ as a formula; labels come from
    // traffic, so such text is quoted as text (numbers are left as they are).
    if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
    return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
  }

  function downloadCsv(id) {
    const { columns, rows } = tables[id];
    const lines = [columns.map((c) => csvCell(c.title)),
                   ...rows.map((r) => columns.map((c) => csvCell(c.value(r))))];
    const blob = new Blob([lines.map((l) => l.join(",")).join("\r\n") + "\r\n"],
                          { type: "text/csv" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    const scope = state.provider === "all" ? "" : `-${state.provider}`;
    link.download = `meterline-${id.replace("table-", "")}-${state.range}${scope}.csv`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  // --- charts -----------------------------------------------------------------------------
  function chart(id, config) {
    if (charts[id]) {
      charts[id].data = config.data;
      charts[id].update("none");
    } else {
      charts[id] = new Chart($(id), {
        ...config,
        options: {
          responsive: true, maintainAspectRatio: false, animation: false,
          interaction: { mode: "index", intersect: false },
          plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
          ...config.options,
        },
      });
    }
  }

  // One series per provider shown (MAX_SERIES at most) and "other" for what is left of the
  // filtered total: providers past the cap, and events that named no provider.
  function providerSeries(total, perProvider, figure) {
    const datasets = perProvider.map(({ provider, answer }) => ({
      label: provider, backgroundColor: colour(provider), stack: "p",
      data: answer.points.map((p) => p[figure]),
    }));
    // The answers are read one after the other while events keep arriving in the window's
    // last minute, so a provider's may already hold a few the total did not: never below 0.
    const rest = total.points.map((p, i) => Math.max(0,
      p[figure] - perProvider.reduce((sum, s) => sum + s.answer.points[i][figure], 0)));
    if (rest.some((x) => x > 1e-9)) {
      datasets.push({ label: "other", backgroundColor: "#bab0ac", stack: "p", data: rest });
    }
    return datasets;
  }

  function drawTrends(total, perProvider) {
    const hourly = total.granularity === "hourly";
    const labels = total.points.map((p) => timeLabel(p.time, hourly));
    const stacked = { x: { stacked: true }, y: { stacked: true, beginAtZero: true } };
    chart("chart-requests", {
      type: "bar",
      data: {
        labels,
        datasets: [
          {
            type: "line", label: "error rate %", yAxisID: "errors", borderColor: "#c0392b",
            backgroundColor: "#c0392b", pointRadius: 0, borderWidth: 2, order: -1,
            data: total.points.map((p) => (p.requests ? (100 * p.errors) / p.requests : null)),
          },
          ...providerSeries(total, perProvider, "requests"),
        ],
      },
      options: {
        scales: {
          ...stacked,
          errors: { position: "right", beginAtZero: true, suggestedMax: 10,
                    grid: { drawOnChartArea: false }, title: { display: true, text: "errors %" } },
        },
      },
    });
    chart("chart-spend", {
      type: "bar",
      data: { labels, datasets: providerSeries(total, perProvider, "cost_usd") },
      options: { scales: stacked },
    });
  }

  function drawLatency(performance) {
    const models = performance.models.slice(0, 10);
    const series = [["p50", "p50_latency_ms", "#76b7b2"], ["p95", "p95_latency_ms", "#4e79a7"],
                    ["p99", "p99_latency_ms", "#e15759"]];
    chart("chart-latency", {
      type: "bar",
      data: {
        labels: models.map((m) => label(m.model)),
        datasets: series.map(([name, key, c]) => ({
          label: name, backgroundColor: c, data: models.map((m) => m[key]),
        })),
      },
      options: { scales: { y: { beginAtZero: true } } },
    });
  }

  function drawBreakdown(costs) {
    const rows = costs.costs.slice(0, 12);
    spendBars("chart-breakdown", rows.map((r) => breakdownLabel(r)), rows, "#4e79a7");
  }

  // Horizontal bars of the rows' cost_usd, one per label.
  function spendBars(id, labels, rows, barColour) {
    chart(id, {
      type: "bar",
      data: {
        labels,
        datasets: [{ label: "USD", backgroundColor: barColour, data: rows.map((r) => r.cost_usd) }],
      },
      options: { indexAxis: "y", plugins: { legend: { display: false } },
                 scales: { x: { beginAtZero: true } } },
    });
  }

  // --- the figures ------------------------------------------------------------------------
  function breakdownDimension() {
    if (state.breakdown !== "metadata") return state.breakdown;
    return `metadata.${$("metadata-key").value.trim() || "customer_id"}`;
  }

  function breakdownLabel(row) {
    if (row.api_key_name && row.key) return `${row.api_key_name} (${row.key})`;
    return label(row.key);
  }

  function drawTiles(providers, usage, performance) {
    const t = usage.totals;
    const p = performance.totals;
    // the providers the filter lists: tool calls and agent runs that name none are no provider
    $("tile-providers").textContent = count(providers.filter((x) => x.provider && x.requests > 0).length);
    $("tile-requests").textContent = count(t.requests);
    $("tile-rate").textContent = p.requests_per_minute >= 1
      ? `${few.format(p.requests_per_minute)} per minute`
      : `${few.format(p.requests_per_minute * 60)} per hour`;
    $("tile-errors").textContent = pct(t.error_rate);
    $("tile-error-count").textContent = `${count(t.errors)} failed`;
    $("tile-latency").textContent = ms(p.p95_latency_ms);
    $("tile-percentiles").textContent = [`p50 ${ms(p.p50_latency_ms)}`, `p99 ${ms(p.p99_latency_ms)}`,
      ...(p.avg_ttft_ms == null ? [] : [`first token ${ms(p.avg_ttft_ms)}`])].join(" · ");
    $("tile-spend").textContent = usd(t.cost_usd);
    $("tile-unpriced").textContent = t.unpriced_requests ? `${count(t.unpriced_requests)} requests unpriced` : "";
    $("tile-tokens").textContent = count(t.total_tokens);
    $("tile-token-split").textContent = `${count(t.input_tokens)} in / ${count(t.output_tokens)} out`;
  }

  const USAGE_COLUMNS = [
    { title: "requests", value: (r) => r.requests, format: count, numeric: true },
    { title: "error rate", value: (r) => r.error_rate, format: pct, numeric: true },
    { title: "total tokens", value: (r) => r.total_tokens, format: count, numeric: true },
    { title: "cost USD", value: (r) => r.cost_usd, format: usd, numeric: true },
    { title: "USD per request", value: (r) => r.cost_per_request_usd, format: usd, numeric: true },
    { title: "USD per 1K tokens", value: (r) => r.cost_per_1k_tokens_usd, format: usd, numeric: true },
    { title: "share", value: (r) => r.share, format: pct, numeric: true },
  ];

  function drawTables(costs, models, keys, budgets) {
    renderTable("table-breakdown", [
      { title: costs.group_by, value: (r) => r.key },
      ...(costs.group_by === "api_key" ? [{ title: "api_key_name", value: (r) => r.api_key_name }] : []),
      ...USAGE_COLUMNS,
    ], costs.costs, "No traffic in this range.");
    renderTable("table-models", [
      { title: "model", value: (r) => r.model },
      { title: "provider", value: (r) => r.provider },
      { title: "requests", value: (r) => r.requests, format: count, numeric: true },
      { title: "error rate", value: (r) => r.error_rate, format: pct, numeric: true },
      { title: "p95 ms", value: (r) => r.p95_latency_ms, format: count, numeric: true },
      { title: "total tokens", value: (r) => r.total_tokens, format: count, numeric: true },
      { title: "cost USD", value: (r) => r.cost_usd, format: usd, numeric: true },
      ...["24h", "7d", "30d"].map((w) => ({
        title: `cost USD, last ${w}`, value: (r) => r.rolling[w].cost_usd, format: usd, numeric: true,
      })),
    ], models.models, "No traffic in this range.");
    renderTable("table-keys", [
      { title: "api_key_id", value: (r) => r.key },
      { title: "api_key_name", value: (r) => r.api_key_name },
      ...USAGE_COLUMNS,
    ], keys.costs, "No traffic in this range.");
    renderTable("table-budgets", [
      { title: "budget", value: (r) => r.budget },
      { title: "scope", value: (r) => Object.entries(r.scope).map(([k, v]) => `${k}=${v}`).join(" ") || "all spend" },
      // a budget `per` user, key, team or metadata key: one row per member, named here
      { title: "member", value: (r) => (r.per ? `${r.per}=${r.member}` : null), format: (x) => x ?? dash },
      { title: "period", value: (r) => r.period },
      { title: "period start", value: (r) => r.period_start },
      { title: "spend USD", value: (r) => r.spend_usd, format: usd, numeric: true },
      { title: "limit USD", value: (r) => r.limit_usd, format: usd, numeric: true },
      { title: "utilization", value: (r) => r.utilization, meter: true },
      { title: "status", value: (r) => r.status, className: (r) => `status-${r.status}` },
    ], budgets, "No budgets: add a budgets: section to pipeline.yaml.");
  }

  // Billed (the providers' imported bills) against estimated, per provider with a bill.
  function drawReconciliation(answer) {
    const rows = answer.rows.length ? [...answer.rows, { ...answer.total, provider: "total" }] : [];
    renderTable("table-reconciliation", [
      { title: "provider", value: (r) => r.provider },
      { title: "estimated USD", value: (r) => r.estimated_cost_usd, format: usd, numeric: true },
      { title: "billed USD", value: (r) => r.billed_cost_usd, format: usd, numeric: true },
      { title: "variance USD", value: (r) => r.variance_usd, format: usd, numeric: true },
      { title: "variance", value: (r) => r.variance_ratio, format: pct, numeric: true },
      { title: "unexplained USD", value: (r) => r.unexplained_usd, format: usd, numeric: true },
      { title: "billing lines", value: (r) => r.billing_lines, format: count, numeric: true },
    ], rows, "No bills in this range: meterline billing import FILE (docs/finops.md#billing).");
  }

  // --- agents, tools, MCP and guardrails ----------------------------------------------------
  const yes = (x) => (x == null ? dash : x ? "yes" : "no");
  // A right-aligned column of the figure `key` of each row.
  const num = (title, key, format = count) => ({ title, value: (r) => r[key], format, numeric: true });

  function drawAgents(answer) {
    const t = answer.totals;
    $("tile-runs").textContent = count(t.runs);
    $("tile-run-duration").textContent = `average ${ms(t.avg_run_duration_ms)}`;
    $("tile-run-cost").textContent = usd(t.cost_usd);
    $("tile-run-calls").textContent = `${count(t.llm_calls)} model calls`;
    $("tile-tool-calls").textContent = count(answer.tool_totals.calls);
    $("tile-tool-latency").textContent = `average ${ms(answer.tool_totals.avg_latency_ms)}`;
    $("tile-mcp-connects").textContent = count(answer.mcp.connects);
    $("tile-mcp-latency").textContent =
      `${count(answer.mcp.sessions)} sessions · average ${ms(answer.mcp.avg_connect_latency_ms)}`;
    const agents = answer.agents.slice(0, 12);
    spendBars("chart-agents", agents.map((a) => label(a.agent)), agents, "#59a14f");
    renderTable("table-agents", [
      { title: "agent", value: (r) => r.agent },
      num("runs", "runs"),
      num("cost USD", "cost_usd", usd),
      num("USD per run", "cost_per_run_usd", usd),
      num("model calls", "llm_calls"),
      num("tool calls", "tool_calls"),
      num("avg run ms", "avg_run_duration_ms"),
      num("errors", "errors"),
    ], answer.agents, "No agent runs in this range.");
    renderTable("table-tools", [
      { title: "tool", value: (r) => r.tool },
      num("calls", "calls"),
      num("errors", "errors"),
      num("avg ms", "avg_latency_ms"),
      num("p95 ms", "p95_latency_ms"),
      num("bytes sent", "request_bytes"),
      num("bytes received", "response_bytes"),
    ], answer.tools, "No tool calls in this range.");
    renderTable("table-mcp", [
      { title: "method", value: (r) => r.method },
      num("requests", "calls"),
      num("sessions", "sessions"),
      num("errors", "errors"),
      num("avg ms", "avg_latency_ms"),
      num("p95 ms", "p95_latency_ms"),
    ], answer.mcp.methods, "No MCP requests in this range.");
  }

  function drawGuardrails(answer) {
    const p = answer.platform;
    $("guardrails-source").textContent = answer.gateway
      ? `rules of receiver ${answer.gateway}` : "no gateway receiver: rules unknown";
    $("tile-models").textContent = count(p.total_models);
    $("tile-protected").textContent = `${count(p.protected_models)} protected`;
    $("tile-rules").textContent = count(p.total_rules);
    $("tile-blocked").textContent = count(p.blocked_today);
    $("tile-block-rate").textContent = `${pct(p.block_rate)} of the range's calls blocked`;
    $("tile-modified").textContent = count(p.modified_today);
    renderTable("table-guardrails", [
      { title: "model", value: (r) => r.model },
      { title: "enabled", value: (r) => r.enabled, format: yes },
      num("rules", "rules_count"),
      num("input rules", "input_rules"),
      num("output rules", "output_rules"),
      num("requests", "total_requests"),
      num("blocked", "blocked"),
      num("modified", "modified"),
      num("block rate", "block_rate", pct),
    ], answer.models, "No model calls in this range.");
    renderTable("table-violations", [
      { title: "user", value: (r) => r.user_id },
      num("requests", "requests"),
      num("violations (blocked)", "guardrail_violations"),
      num("modified", "modified"),
      num("guardrails fired", "flagged"),
    ], answer.users, "No guardrail fired in this range.");
  }

  function fillProviders(providers) {
    const select = $("provider");
    const names = providers.map((p) => p.provider).filter((p) => p);
    if (state.provider !== "all" && !names.includes(state.provider)) names.push(state.provider);
    const wanted = ["all", ...names];
    const have = [...select.options].map((o) => o.value);
    if (wanted.join("\n") === have.join("\n")) return;
    select.replaceChildren(...wanted.map((name) =>
      new Option(name === "all" ? "All providers" : name, name)));
    select.value = state.provider;
  }

  // One refresh at a time; a change of filter during one runs another right after it.
  async function refresh() {
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    document.body.dataset.state = "loading";
    const { range, provider } = state;
    const filter = { range, provider };
    try {
      const everyProvider = await api("analytics/providers", { range });
      fillProviders(everyProvider.providers);
      const drawn = (provider === "all"
        ? everyProvider.providers.map((p) => p.provider).filter((p) => p).slice(0, MAX_SERIES)
        : [provider]);
      const [usage, performance, models, costs, keys, budgets, agents, guardrails, total,
             reconciliation, ...series] = await Promise.all([
        api("analytics/usage", filter),
        api("analytics/performance", filter),
        api("analytics/models", filter),
        api("analytics/costs", { ...filter, group_by: breakdownDimension() }),
        api("analytics/costs", { ...filter, group_by: "api_key" }),
        api("budgets"),
        api("analytics/agents", { range }),
        api("analytics/guardrails", filter),
        api("analytics/timeseries", filter),
        api("analytics/reconciliation", { ...filter, by: "provider" }),
        ...drawn.map((name) => api("analytics/timeseries", { range, provider: name })),
      ]);
      if (range !== state.range || provider !== state.provider) return; // changed meanwhile
      const shown = provider === "all" ? everyProvider.providers
        : everyProvider.providers.filter((p) => p.provider === provider);
      notice(null);
      $("token-form").hidden = true;
      showContent(true);
      drawTiles(shown, usage, performance);
      drawTrends(total, drawn.map((name, i) => ({ provider: name, answer: series[i] })));
      drawLatency(performance);
      drawBreakdown(costs);
      drawTables(costs, models, keys, budgets);
      drawReconciliation(reconciliation);
      drawAgents(agents);
      drawGuardrails(guardrails);
      for (const el of document.querySelectorAll(".breakdown-name")) el.textContent = costs.group_by;
      const when = (iso) => iso.replace("T", " ").replace(":00Z", " UTC");
      $("window").textContent = `${when(usage.since)} to ${when(usage.until)}`;
      $("updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}, every ${REFRESH_MS / 1000} s`;
      document.body.dataset.refreshes = Number(document.body.dataset.refreshes) + 1;
    } catch (error) {
      failed(error);
    } finally {
      state.busy = false;
      if (state.again) {
        state.again = false;
        refresh();
      } else {
        document.body.dataset.state = "ready";
      }
    }
  }

  function failed(error) {
    if (error.status === 401) {
      showContent(false);
      notice(token() ? "The admin server refused this token." : "This admin server requires a bearer token.", true);
      $("token-form").hidden = false;
      $("token-input").focus();
    } else if (error.status === 404) {
      showContent(false);
      notice("No analytics on this daemon: the analytics API is served by the finops " +
             "extension, which reads a clickhouse exporter, and pipeline.yaml configures none. " +
             "Add both (exporters: clickhouse: {} in a pipeline, extensions: finops: {}) " +
             "to see traffic, latency and spend here; /metrics and " +
             "/api/v1/status work without them.");
    } else {
      // Keep the last figures on screen: the next refresh may well succeed.
      notice(`Cannot read the analytics API (${error.status || "network"}): ${error.message}`, true);
    }
  }

  // --- controls ---------------------------------------------------------------------------
  function remember() {
    const query = new URLSearchParams();
    if (state.range !== "30d") query.set("range", state.range);
    if (state.provider !== "all") query.set("provider", state.provider);
    history.replaceState(null, "", location.pathname + (query.size ? `?${query}` : ""));
  }

  if (![...$("range").options].some((o) => o.value === state.range)) {
    // a link's own range (?range=12h): shown as asked, not as a blank choice
    $("range").add(new Option(`Last ${state.range}`, state.range));
  }
  $("range").value = state.range;
  fillProviders([]);
  $("range").addEventListener("change", (e) => { state.range = e.target.value; remember(); refresh(); });
  $("provider").addEventListener("change", (e) => { state.provider = e.target.value; remember(); refresh(); });
  $("breakdown").addEventListener("change", (e) => {
    state.breakdown = e.target.value;
    $("metadata-key").hidden = state.breakdown !== "metadata";
    refresh();
  });
  $("metadata-key").addEventListener("change", refresh);
  for (const button of document.querySelectorAll("[data-csv]")) {
    button.addEventListener("click", () => downloadCsv(button.dataset.csv));
  }
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    $("forget-token").hidden = false;
    refresh();
  });
  $("forget-token").hidden = !token();
  $("forget-token").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    $("forget-token").hidden = true;
    refresh();
  });

  // --- audit: the last configuration changes (/api/v1/audit) -----------------------------
  // Apart from the analytics: shown whenever the admin API answers, with or without finops.
  const AUDIT_SIGNS = { added: "+", removed: "−", changed: "~" };

  function auditChanges(entry) {
    const c = entry.changes || {};
    return Object.entries(AUDIT_SIGNS).flatMap(([part, sign]) => (c[part] || []).map((x) => {
      const keys = Object.keys(x.keys || {});
      return `${sign} ${x.kind} ${x.id}${keys.length ? ` (${keys.join(", ")})` : ""}`;
    })).join("; ");
  }

  async function refreshAudit() {
    try {
      const answer = await api("audit", { limit: 10 });
      $("audit").hidden = false;
      renderTable("table-audit", [
        { title: "time", value: (r) => r.time.replace("T", " ").replace("Z", "") },
        { title: "trigger", value: (r) => r.trigger },
        { title: "result", value: (r) => r.result, className: (r) => `result-${r.result}` },
        { title: "file sha256", value: (r) => (r.sha256 || "").slice(0, 12), format: String },
        { title: "what changed", value: auditChanges, format: String, className: () => "wrap" },
        { title: "error", value: (r) => r.error || "", format: String, className: () => "wrap" },
      ], answer.entries, "No configuration change recorded yet.");
    } catch {
      $("audit").hidden = true; // a token is asked for above; an older daemon has no log
    }
  }

  refreshAudit();
  setInterval(refreshAudit, REFRESH_MS);
  // --- end audit ----------------------------------------------------------------------------

  refresh();
  setInterval(refresh, REFRESH_MS);
})();
