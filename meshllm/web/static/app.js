// meshllm dashboard: polls GET /v1/dashboard, draws the mesh, and chats through the node's own
// POST /v1/chat/completions (stream: true). No framework, no build step, nothing from the internet.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// --- small helpers (every text goes in as a text node: names come from other machines) ---------
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmtBytes(b) {
  if (b === null || b === undefined) return "?";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(b < 10 ? 1 : 0) : b) + " " + u[i];
}
function fmtS(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms" : s.toFixed(2) + " s";
}
function fmtNum(x, d = 1) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }
function fmtMbps(x) { return x >= 1000 ? (x / 1000).toFixed(1) + " Gb/s" : x.toFixed(x < 10 ? 1 : 0) + " Mb/s"; }

// --- the dashboard -----------------------------------------------------------------------------
let last = null;

async function poll() {
  try {
    const r = await fetch("/v1/dashboard", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    last = await r.json();
    render(last);
  } catch (e) {
    const s = $("status");
    s.dataset.ready = "false";
    s.textContent = "node unreachable (" + e.message + ")";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function render(d) {
  const s = $("status");
  s.dataset.ready = String(!!d.ready);
  s.textContent = d.ready ? "ready" : "not ready: " + (d.why_not_ready || "?");
  const node = d.node || {};
  $("model").textContent = (node.model ? node.model + " · " : "") + "node " + (node.name || "?");
  const plan = d.plan;
  $("summary").textContent = [
    "epoch " + (d.epoch || 0) + (d.pending_epoch ? " (epoch " + d.pending_epoch + " pending)" : ""),
    plan ? "strategy " + (plan.strategy || "?") : null,
    "term " + (d.term ?? "?"),
    "leader " + (d.leader_name || (d.leader ? d.leader.slice(0, 8) : "none")),
  ].filter(Boolean).join(" · ");
  const keyNeeded = !!(d.security && d.security.api_key_required);
  $("api-key-row").hidden = !keyNeeded;
  renderTopology(d);
  renderPlan(d);
  renderNodes(d);
  renderReplicas(d);
}

function renderTopology(d) {
  const svgEl = $("topology");
  const W = Math.max(svgEl.clientWidth || 900, 300), H = 300;
  svgEl.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svgEl.replaceChildren();
  const nodes = new Map((d.nodes || []).map((n) => [n.id, n]));
  const groups = (d.replicas || []).map((r) => ({ label: `replica ${r.id}`, role: r.role, stages: r.stages, id: r.id }));
  const placed = new Set(groups.flatMap((g) => g.stages.map((s) => s.node)));
  const rest = [...nodes.values()].filter((n) => !placed.has(n.id));
  if (rest.length) groups.push({ label: d.plan ? "not in the plan" : "members (no plan yet)", role: null,
                                 stages: rest.map((n) => ({ node: n.id, name: n.name, layers: null })) });
  if (!groups.length) {
    svgEl.append(sv("text", { x: 20, y: 40 }, "no members yet"));
    return;
  }
  const gap = 16, gw = (W - gap * (groups.length + 1)) / groups.length;
  const pos = new Map();
  const boxes = [];
  groups.forEach((g, gi) => {
    const gx = gap + gi * (gw + gap), gy = 28, gh = H - 44;
    const color = g.role ? `var(--${g.role})` : "var(--line)";
    svgEl.append(sv("rect", { x: gx, y: gy, width: gw, height: gh, rx: 10, fill: "none", stroke: color,
                              "stroke-width": 2, "stroke-dasharray": g.role ? "" : "5 4",
                              class: "replica-group", "data-replica": g.id ?? "" }));
    svgEl.append(sv("text", { x: gx + 10, y: gy - 8 }, g.label + (g.role ? " · " + g.role.toUpperCase() : "")));
    const n = g.stages.length, bw = Math.min(170, (gw - 20 * (n + 1)) / n), bh = 96;
    g.stages.forEach((st, si) => {
      const x = gx + 20 + si * (bw + 20) + (gw - 20 - n * (bw + 20)) / 2, y = gy + gh - bh - 16;
      if (!pos.has(st.node)) pos.set(st.node, { x: x + bw / 2, y: y + bh / 2 });
      boxes.push({ st, x, y, bw, bh, color, next: !!g.role && si < n - 1 });  // → : pipeline order
    });
  });
  // links first, under the boxes; pairs of nodes in different groups bow upwards
  const linkLayer = sv("g", {});
  svgEl.append(linkLayer);
  // longer links bow higher, so their labels (at the top of each arc) do not sit on each other
  const links = (d.links || []).filter((l) => pos.has(l.a) && pos.has(l.b))
    .sort((p, q) => Math.abs(pos.get(p.a).x - pos.get(p.b).x) - Math.abs(pos.get(q.a).x - pos.get(q.b).x));
  const labels = [];
  links.forEach((l, i) => {
    const a = pos.get(l.a), b = pos.get(l.b);
    const top = Math.min(a.y, b.y) - 48;  // the boxes' top edge
    const apex = Math.max(44, top - 24 - i * ((top - 44) / Math.max(links.length, 1)));
    const mx = (a.x + b.x) / 2, cy = 2 * apex - top;  // a quadratic's midpoint is halfway to its control point
    linkLayer.append(sv("path", { d: `M${a.x},${top} Q${mx},${cy} ${b.x},${top}`, fill: "none",
                                  stroke: "#5d6b7a", "stroke-width": 1.5, class: "link" }));
    labels.push([mx, apex, fmtMbps(l.mbps) + (l.rtt_ms !== null && l.rtt_ms !== undefined ? ` · ${l.rtt_ms.toFixed(1)} ms` : "")]);
  });
  for (const [x, y, text] of labels) {
    const w = text.length * 6.2 + 8;
    linkLayer.append(sv("rect", { x: x - w / 2, y: y - 11, width: w, height: 15, rx: 3, fill: "#171e26" }));
    linkLayer.append(sv("text", { x, y, "text-anchor": "middle", class: "sub link-label" }, text));
  }
  for (const { st, x, y, bw, bh, color, next } of boxes) {
    const n = nodes.get(st.node) || { name: st.name, state: "?" };
    const g = sv("g", { class: "topo-node", "data-node-id": st.node });
    const alive = n.state === "alive";
    g.append(sv("rect", { x, y, width: bw, height: bh, rx: 8, fill: "#0f1419", stroke: alive ? color : "var(--bad)",
                          "stroke-width": n.self ? 3 : 1.5 }));
    g.append(sv("text", { x: x + 8, y: y + 18 }, (n.leader ? "★ " : "") + (n.self ? "◉ " : "") + (n.name || st.name)));
    g.append(sv("text", { x: x + 8, y: y + 35, class: "sub" },
                st.layers ? `blocks [${st.layers[0]}, ${st.layers[1]})` : (n.layers && n.layers.length ? "" : "no blocks")));
    g.append(sv("text", { x: x + 8, y: y + 51, class: "sub" }, n.state + (n.device && n.device.decode_ms_per_token
      ? ` · ${n.device.decode_ms_per_token.toFixed(2)} ms/tok` : "")));
    const m = n.memory || {};
    if (m.budget) {
      const frac = Math.min(1, (m.used || 0) / m.budget);
      g.append(sv("rect", { x: x + 8, y: y + 62, width: bw - 16, height: 7, rx: 3, fill: "#2a3541" }));
      g.append(sv("rect", { x: x + 8, y: y + 62, width: Math.max(1, (bw - 16) * frac), height: 7, rx: 3, fill: color }));
      g.append(sv("text", { x: x + 8, y: y + 86, class: "sub" }, `${fmtBytes(m.used)} / ${fmtBytes(m.budget)}`));
    }
    svgEl.append(g);
    if (next) svgEl.append(sv("text", { x: x + bw + 4, y: y + bh / 2 + 4, class: "sub" }, "→"));
  }
}

function cmpRow(label, measured, predicted, fmt) {
  return el("tr", {}, el("td", {}, label), el("td", { class: "num" }, fmt(measured)), el("td", { class: "num" }, fmt(predicted)));
}

// a measured figure judged against its prediction (the server's web/compare.py): the note says
// which estimate is off, and by how much, when they differ by more than 20%
function verdictRow(key, v) {
  if (!v || !v.off || !v.note) return null;
  return el("tr", { class: "verdict", "data-key": key }, el("td", { colspan: 3, class: "verdict off" }, "⚠ " + v.note));
}
function fmtTraffic(rate, inLen, outLen) {
  return (rate === null || rate === undefined ? "" : `${fmtNum(rate, 2)} req/s, `) +
    `${fmtNum(inLen, 0)} prompt tokens, ${fmtNum(outLen, 0)} generated (means)`;
}

function renderPlan(d) {
  const p = d.plan, box = $("plan");
  if (!p) {
    box.replaceChildren(el("p", { class: "muted" }, d.why_not_ready || "no active plan"));
    return;
  }
  const pr = p.predicted || {}, me = p.measured || {}, ft = p.predicted_for_traffic || {}, cmp = p.compare || {};
  const cap = cmp.tokens_per_s || {};
  box.replaceChildren(
    el("table", {},
      el("tr", {}, el("th", {}, "epoch"), el("td", { id: "plan-epoch" }, p.epoch)),
      el("tr", {}, el("th", {}, "strategy"), el("td", { id: "plan-strategy" }, p.strategy || "?")),
      el("tr", {}, el("th", {}, "why this plan"), el("td", { id: "plan-reason" }, p.reason || "–")),
      p.note ? el("tr", {}, el("th", {}, "note"), el("td", {}, p.note)) : null,
      p.workload ? el("tr", {}, el("th", {}, "planned for"), el("td", { id: "plan-workload" },
        fmtTraffic(p.workload.arrival_rate, p.workload.mean_input_len, p.workload.mean_output_len))) : null,
      me.requests ? el("tr", {}, el("th", {}, "traffic measured"), el("td", { id: "plan-traffic" },
        fmtTraffic(me.arrival_rate, me.mean_input_len, me.mean_output_len))) : null),
    el("table", { style: "margin-top:8px", id: "plan-figures" },
      el("tr", {}, el("th", {}, `last ${me.requests || 0} requests at ${me.entries || 0} entries`), el("th", { class: "num" }, "measured"),
         el("th", { class: "num", title: "the planner's queueing estimate for the traffic measured" },
            p.predicted_for_traffic ? "predicted for it" : "predicted")),
      // before any traffic (or a rate) is measured: the plan's own figures, for the planned workload
      cmpRow("waiting time", me.wait_s, p.predicted_for_traffic ? ft.mean_wait_s : pr.mean_wait_s, fmtS),
      verdictRow("wait_s", cmp.wait_s),
      cmpRow("time to first token", me.ttft_s, p.predicted_for_traffic ? ft.mean_ttft_s : pr.mean_ttft_s, fmtS),
      verdictRow("ttft_s", cmp.ttft_s),
      el("tr", {}, el("td", {}, "tokens/s"), el("td", { class: "num" }, fmtNum(me.tokens_per_s, 1)),
         el("td", { class: "num", title: "a capacity: every decoder at its full batch" }, "≤ " + fmtNum(pr.throughput_tps, 1))),
      cap.used !== null && cap.used !== undefined && !cap.off ? el("tr", { class: "verdict", "data-key": "tokens_per_s" },
        el("td", { colspan: 3, class: "verdict" },
           `${fmtNum(100 * cap.used, 0)}% of the predicted capacity (every decoder at its full batch)`)) : null,
      verdictRow("tokens_per_s", cap),
      ft.overloaded ? el("tr", {}, el("td", { colspan: 3, class: "state dead" }, "the planner predicts overload at the rate measured")) : null,
      pr.overloaded ? el("tr", {}, el("td", { colspan: 3, class: "state dead" }, "the planner predicts overload at the planned rate")) : null));
}

function renderNodes(d) {
  const rows = (d.nodes || []).map((n) => {
    const m = n.memory || {}, dev = n.device || {};
    const frac = m.budget ? Math.min(1, (m.used || 0) / m.budget) : 0;
    return el("tr", { class: "node-row", "data-node-id": n.id },
      el("td", {}, (n.leader ? "★ " : "") + n.name + (n.self ? " (this node)" : ""),
         el("div", { class: "muted small" }, n.addr || "")),
      el("td", {}, el("span", { class: "state " + n.state }, n.state)),
      el("td", { class: "small" }, n.device ? `${dev.threads ?? "?"} thr · ×${fmtNum(dev.slowdown, 1)} slow · ` +
         `${fmtNum(dev.tflops, 2)} TFLOPS · ${fmtNum(dev.mem_bw_gbs, 1)} GB/s · ${fmtNum(dev.decode_ms_per_token, 2)} ms/tok`
         : el("span", { class: "muted" }, "profiling…")),
      el("td", {}, `${fmtBytes(m.used)} / ${fmtBytes(m.budget)}`,
         el("div", { class: "mem", title: m.source === "planned" ? "planned weights (node not reachable)" : "reported by the node" },
            el("div", { style: `width:${(100 * frac).toFixed(1)}%` })),
         m.source === "planned" ? el("div", { class: "muted small" }, "planned") : null),
      el("td", { class: "small" }, (n.layers || []).map((l) => `[${l[0]}, ${l[1]})`).join(" ") || "–"),
      el("td", { class: "num held" }, n.held ?? "–"),
      el("td", { class: "num", title: "speculative decoding: draft tokens kept per drafted step (rings this node is stage 0 of)" },
         n.speculation && n.speculation.steps ? `${fmtNum(n.speculation.per_step, 2)} · ` +
           `${fmtNum(100 * n.speculation.accepted / Math.max(1, n.speculation.drafted), 0)}%` : "–"));
  });
  $("nodes").replaceChildren(el("table", {},
    el("tr", {}, ["node", "state", "device profile", "memory used / budget", "blocks", "requests held", "drafts kept"].map((h) => el("th", {}, h))),
    rows));
}

function renderReplicas(d) {
  const box = $("replicas");
  if (!d.replicas || !d.replicas.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no replicas yet"));
    return;
  }
  box.replaceChildren(...d.replicas.map((r) => {
    const live = r.live || {}, me = r.measured || {}, pr = r.predicted || {}, cmp = r.compare || {};
    const rows = [el("span", { class: "h" }, ""), el("span", { class: "h" }, "measured"), el("span", { class: "h" }, "predicted")];
    const add = (label, m, p, fmt, key) => {
      rows.push(el("span", {}, label), el("span", {}, fmt(m)), el("span", {}, p === undefined ? "" : fmt(p)));
      const v = key && cmp[key];
      if (v && v.off && v.note) rows.push(el("span", { class: "verdict off", "data-key": key }, "⚠ " + v.note));
    };
    const liveRows = [];
    if (r.role !== "decoder") liveRows.push(el("span", {}, "prefilling"), el("span", { class: "prefilling" }, live.prefilling ?? 0), el("span", {}, ""));
    if (r.role !== "prefill") {
      liveRows.push(el("span", {}, "decoding (whole mesh)"),
        el("span", { class: "decoding" }, live.decoding === null || live.decoding === undefined ? "–" : `${live.decoding} / ${live.max_batch}`),
        el("span", {}, live.free_kv_tokens === null || live.free_kv_tokens === undefined ? "" : `${live.free_kv_tokens} KV tokens free`));
      liveRows.push(el("span", {}, "streaming to entries"), el("span", {}, live.streaming ?? 0), el("span", {}, ""));
    }
    if (r.role !== "decoder") {
      add("waiting time", me.wait_s, undefined, fmtS);
      add("time to first token", me.ttft_s, undefined, fmtS);
      add("prefill (prompt sent → first token)", me.prefill_s, pr.prefill_s, fmtS, "prefill_s");
    }
    if (r.role !== "prefill") add("tokens/s per request", me.tokens_per_s, pr.tokens_per_s, (x) => fmtNum(x, 1), "tokens_per_s");
    const count = r.role === "prefill" ? me.prefilled : r.role === "decoder" ? me.decoded : Math.max(me.prefilled || 0, me.decoded || 0);
    return el("div", { class: "card replica-card", "data-replica": r.id, "data-role": r.role },
      el("h3", {}, `replica ${r.id}`, el("span", { class: "role " + r.role }, r.role.toUpperCase()),
         el("span", { class: "muted small" }, `${count || 0} requests measured`)),
      el("div", { class: "stages" }, r.stages.map((s) => `${s.name} [${s.layers[0]}, ${s.layers[1]})`).join("  →  ")),
      el("div", { class: "kv" }, liveRows, rows));
  }));
}

// --- chat -----------------------------------------------------------------------------------------
const KEY_STORE = "meshllm.apiKey";
let history = [];
let controller = null;

function addMsg(role, text) {
  const content = el("div", { class: "content" }, text);
  const m = el("div", { class: "msg " + role }, el("div", { class: "who" }, role === "user" ? "you" : "mesh"), content);
  $("chat-log").append(m);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return m;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMsg("user", text);
  const msg = addMsg("assistant", "");
  const out = msg.querySelector(".content");
  const status = $("chat-status");
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  const body = { messages: history, stream: true, max_tokens: Number($("max-tokens").value) || 128,
                 temperature: Number($("temperature").value) };
  controller = new AbortController();
  setBusy(true);
  msg.dataset.state = "streaming";
  status.textContent = "waiting for the first token…";
  const t0 = performance.now();
  let tFirst = null, tokens = 0, reason = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      let why = "HTTP " + r.status;
      try { why = (await r.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(why);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;  // SSE comments (keep-alives) and other fields
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || "the request failed");
          const ch = (j.choices || [])[0];
          if (!ch) continue;
          tokens += ((j.meshllm || {}).token_ids || []).length;
          const piece = ch.delta && ch.delta.content;
          if (piece) {
            if (tFirst === null) tFirst = performance.now();
            out.textContent += piece;
            $("chat-log").scrollTop = $("chat-log").scrollHeight;
          }
          if (ch.finish_reason) reason = ch.finish_reason;
        }
      }
      if (tFirst !== null) status.textContent = `${tokens} tokens · first text after ${fmtS((tFirst - t0) / 1000)}`;
    }
    history.push({ role: "assistant", content: out.textContent });
    msg.dataset.state = "done";
    status.textContent = `done (${reason || "end"}) · ${tokens} tokens in ${fmtS((performance.now() - t0) / 1000)}` +
      (tFirst !== null ? ` · first text after ${fmtS((tFirst - t0) / 1000)}` : "");
  } catch (e) {
    if (e.name === "AbortError") {
      msg.dataset.state = "stopped";
      status.textContent = "stopped";
      history.push({ role: "assistant", content: out.textContent });
    } else {
      msg.dataset.state = "error";
      msg.classList.add("error");
      if (!out.textContent) out.textContent = "error: " + e.message;
      status.textContent = "error: " + e.message;
      history.pop();  // the question was not answered: leave it out of the conversation
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

function setupChat() {
  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(KEY_STORE) || "";
  keyInput.addEventListener("input", () => sessionStorage.setItem(KEY_STORE, keyInput.value.trim()));
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || controller) return;
    $("chat-input").value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    $("chat-log").replaceChildren();
    $("chat-status").textContent = "";
  });
}

setupChat();
poll();
window.addEventListener("resize", () => { if (last) renderTopology(last); });
