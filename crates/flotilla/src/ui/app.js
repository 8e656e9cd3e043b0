// The cluster view of `flotilla dev`: draws the members' Raft views as they arrive on
// /events (server-sent events; the format is in docs/raft-view.md) and sends the controls.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const CENTER = { x: 250, y: 210 };
const ORBIT = 150;
const BODY_R = 48;
const RING_R = 58;
const RING_LENGTH = 2 * Math.PI * RING_R;
const DOTS_MAX = 80;

const KIND_COLORS = {
  Append: "#2b6cb0", AppendResp: "#90b4e0", Heartbeat: "#6b7280", HeartbeatResp: "#b8bcc4",
  PreVote: "#b88a00", PreVoteResp: "#e0c060", Vote: "#c2571a", VoteResp: "#eba37a",
  Snapshot: "#7a4fa0", SnapshotResp: "#b9a0d0", ReadIndex: "#0e7c86", ReadIndexResp: "#7cc3c9",
  TimeoutNow: "#b91c1c",
};
const KIND_HELP = {
  Append: "AppendEntries carrying log entries from the leader (§5.3)",
  Heartbeat: "an empty AppendEntries: the leader is alive, reset your timer (§5.2)",
  PreVote: "would you vote for me? asked before a real election, so a member cut off cannot disrupt the others (thesis §9.6)",
  Vote: "RequestVote for a new term (§5.2)",
  Snapshot: "InstallSnapshot to a follower whose missing entries were compacted away (§7)",
  ReadIndex: "a follower asks the leader for a safe read index (thesis §6.4)",
  TimeoutNow: "a leadership transfer: campaign now (thesis §3.10)",
};
const ROLE_HELP = {
  follower: "Follower: answers the leader and candidates; campaigns if its election timer fires (§5.1, §5.2)",
  "pre-candidate": "Pre-candidate: asks whether it could win before starting an election (thesis §9.6)",
  candidate: "Candidate: voted for itself in a new term and asks the others for votes (§5.2)",
  leader: "Leader: accepts writes, replicates its log, sends heartbeats (§5.2, §5.3)",
  learner: "Learner: receives the log but does not vote (§6, as etcd extends it)",
};

const state = {
  members: [],        // names, in order
  slowMotion: false,
  views: new Map(),   // name -> { view, at }
  process: new Map(), // name -> running | paused | killed | exited
  cutOff: new Set(),  // names cut off from the others (a partition)
  edges: [],          // { a, b, line }
  sent: new Map(),    // name -> Map("to|kind" -> count)
  rates: [],          // { at, from, kind, count } in the last second
  nodes: new Map(),   // name -> svg parts
  seenLeaders: new Set(),
  seenConfigs: new Set(),
  dots: 0,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, parent = null, ns = null) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function nameOf(hex) {
  for (const [name, { view }] of state.views) if (view.member === hex) return name;
  return hex ? hex.slice(0, 6) : "";
}

function termColor(term, light) {
  const hue = (term * 67) % 360;
  return light ? `hsl(${hue} 55% 88%)` : `hsl(${hue} 55% 38%)`;
}

function position(i) {
  const angle = -Math.PI / 2 + (2 * Math.PI * i) / state.members.length;
  return { x: CENTER.x + ORBIT * Math.cos(angle), y: CENTER.y + ORBIT * Math.sin(angle) };
}

// ----- Drawing the members ------------------------------------------------------------------

function buildCluster() {
  const svg = $("cluster");
  svg.replaceChildren();
  state.nodes.clear();
  const edges = el("g", {}, svg, SVG);
  state.edges = [];
  state.members.forEach((a, i) => state.members.forEach((b, j) => {
    if (j <= i) return;
    const p = position(i), q = position(j);
    const line = el("line", { class: "edge", x1: p.x, y1: p.y, x2: q.x, y2: q.y }, edges, SVG);
    state.edges.push({ a, b, line });
  }));
  state.dotLayer = el("g", {}, svg, SVG);
  state.members.forEach((name, i) => {
    const p = position(i);
    const g = el("g", { class: "member", "data-name": name, transform: `translate(${p.x},${p.y})` }, svg, SVG);
    const title = el("title", {}, g, SVG);
    el("circle", { class: "ring-back", r: RING_R }, g, SVG);
    const ring = el("circle", {
      class: "ring", r: RING_R, transform: "rotate(-90)",
      "stroke-dasharray": `0 ${RING_LENGTH}`,
    }, g, SVG);
    const body = el("circle", { r: BODY_R, fill: "var(--down)" }, g, SVG);
    const label = el("text", { class: "name", y: -12 }, g, SVG);
    label.textContent = name;
    const role = el("text", { class: "detail", y: 5 }, g, SVG);
    const term = el("text", { class: "detail", y: 22 }, g, SVG);
    const vote = el("text", { class: "vote", y: RING_R + 18 }, g, SVG);
    state.nodes.set(name, { g, title, ring, body, role, term, vote, pos: p });
  });
  buildControls();
  buildLegend();
}

function drawEdges() {
  for (const { a, b, line } of state.edges) {
    const cut = state.cutOff.has(a) || state.cutOff.has(b);
    line.setAttribute("class", cut ? "edge cut" : "edge");
    line.innerHTML = cut ? "<title>partitioned: every message on this link is dropped</title>" : "";
  }
}

function buildLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  for (const kind of ["Append", "Heartbeat", "PreVote", "Vote", "Snapshot", "TimeoutNow"]) {
    const span = el("span", { title: KIND_HELP[kind] }, legend);
    el("i", { style: `background:${KIND_COLORS[kind]}` }, span);
    span.append(kind);
  }
}

function roleOf(name) {
  const process = state.process.get(name) || "running";
  if (process !== "running") return process;
  const entry = state.views.get(name);
  if (!entry) return "starting";
  if (entry.view.stopped) return "stopped";
  return entry.view.learner ? "learner" : entry.view.role;
}

function drawMember(name) {
  const node = state.nodes.get(name);
  const entry = state.views.get(name);
  if (!node) return;
  const role = roleOf(name);
  const up = ["follower", "pre-candidate", "candidate", "leader", "learner"].includes(role);
  node.g.style.opacity = role === "removed" ? 0.35 : 1;
  node.g.setAttribute("class", `member ${role}`);
  node.g.setAttribute("data-role", role);
  node.body.setAttribute("fill", up ? `var(--${role})` : "var(--down)");
  node.role.textContent = role;
  if (entry) {
    const v = entry.view;
    node.g.setAttribute("data-term", v.term);
    node.term.textContent = `term ${v.term}`;
    node.vote.textContent = state.cutOff.has(name) ? "cut off from the others"
      : up && v.vote && role !== "leader" ? `voted for ${nameOf(v.vote)} in term ${v.term}` : "";
    node.title.textContent = `${name} (${v.member}): ${ROLE_HELP[v.learner ? "learner" : v.role] || role}.\n` +
      `Term ${v.term}; voted for ${v.vote ? nameOf(v.vote) : "nobody"} in it (§5.2: one vote per term).\n` +
      `Commit ${v.commit}, applied ${v.applied}, last index ${v.last_index}.\n` +
      `The ring: election timer, ${v.election_elapsed_ticks} of ${v.election_timeout_ticks} ticks of ${v.tick_ms} ms (§5.2).`;
  }
}

// The election timer between views: it runs on at one tick per tick_ms.
function drawRings(now) {
  for (const [name, node] of state.nodes) {
    const entry = state.views.get(name);
    let fraction = 0;
    if (entry && roleOf(name) !== "killed" && roleOf(name) !== "exited") {
      const v = entry.view;
      const paused = state.process.get(name) === "paused";
      const ticks = v.election_elapsed_ticks + (paused ? 0 : (now - entry.at) / Math.max(v.tick_ms, 1));
      fraction = Math.min(ticks / Math.max(v.election_timeout_ticks, 1), 1);
    }
    node.ring.setAttribute("stroke-dasharray", `${fraction * RING_LENGTH} ${RING_LENGTH}`);
  }
  requestAnimationFrame(drawRings);
}

// ----- Messages ------------------------------------------------------------------------------

function countMessages(name, view, now) {
  const before = state.sent.get(name);
  const after = new Map(view.messages_sent.map((m) => [`${m.to}|${m.kind}`, m.count]));
  state.sent.set(name, after);
  if (!before) return;
  for (const [key, count] of after) {
    const delta = count - (before.get(key) || 0);
    if (delta <= 0) continue;
    const [to, kind] = key.split("|");
    state.rates.push({ at: now, from: name, kind, count: delta });
    flyDot(name, nameOf(to), kind);
  }
}

function flyDot(from, to, kind) {
  const a = state.nodes.get(from), b = state.nodes.get(to);
  if (!a || !b || state.dots >= DOTS_MAX) return;
  state.dots++;
  const dot = el("circle", { class: "dot", r: 5, fill: KIND_COLORS[kind] || "#444" }, state.dotLayer, SVG);
  const duration = state.slowMotion ? 1500 : 450;
  // Across a partition a message is lost on the way: it stops halfway.
  const end = state.cutOff.has(from) || state.cutOff.has(to) ? 0.5 : 1;
  const start = performance.now();
  const step = (now) => {
    const t = Math.min((now - start) / duration, end);
    dot.setAttribute("cx", a.pos.x + (b.pos.x - a.pos.x) * t);
    dot.setAttribute("cy", a.pos.y + (b.pos.y - a.pos.y) * t);
    if (t < end) requestAnimationFrame(step);
    else { dot.remove(); state.dots--; }
  };
  requestAnimationFrame(step);
}

function drawRates(now) {
  state.rates = state.rates.filter((r) => now - r.at < 1000);
  const table = new Map();
  const kinds = new Set();
  for (const r of state.rates) {
    kinds.add(r.kind);
    const row = table.get(r.from) || new Map();
    row.set(r.kind, (row.get(r.kind) || 0) + r.count);
    table.set(r.from, row);
  }
  const out = $("message-table");
  if (kinds.size === 0) { out.textContent = "none in the last second"; return; }
  const t = el("table");
  const head = el("tr", {}, t);
  el("th", {}, head).textContent = "from";
  for (const k of kinds) {
    const th = el("th", { title: KIND_HELP[k] || KIND_HELP[k.replace("Resp", "")] || k }, head);
    th.textContent = k;
  }
  for (const name of state.members) {
    const tr = el("tr", {}, t);
    el("td", {}, tr).textContent = name;
    for (const k of kinds) el("td", {}, tr).textContent = (table.get(name) || new Map()).get(k) || "";
  }
  out.replaceChildren(t);
}

// ----- Logs, controls, timeline ----------------------------------------------------------------

function drawLogs() {
  const logs = $("logs");
  logs.replaceChildren();
  for (const name of state.members) {
    const row = el("div", { class: "log" }, logs);
    el("span", { class: "who" }, row).textContent = name;
    const entry = state.views.get(name);
    if (!entry || roleOf(name) === "killed" || roleOf(name) === "exited") {
      row.append(roleOf(name));
      continue;
    }
    const v = entry.view;
    for (const e of v.log_tail) {
      const committed = e.index <= v.commit;
      const box = el("div", {
        class: `entry${committed ? "" : " uncommitted"}`,
        style: `border-color:${termColor(e.term)};background:${termColor(e.term, true)}`,
        title: `entry ${e.index} of term ${e.term}: ${committed ? "committed" : "not committed yet"}` +
          `${e.index <= v.applied ? ", applied" : ""}`,
      }, row);
      el("b", {}, box).textContent = e.index;
      box.append(`t${e.term}`);
    }
    el("span", { style: "margin-left:.5em;color:var(--muted)" }, row).textContent =
      `commit ${v.commit} · applied ${v.applied}`;
  }
}

function buildControls() {
  const box = $("controls");
  box.replaceChildren();
  const actions = [
    ["kill", "Kill", "SIGKILL the process: it loses nothing it acknowledged, its log is on disk"],
    ["restart", "Restart", "start the process again from its data directory"],
    ["pause", "Pause", "SIGSTOP: the process stops, its connections stay open"],
    ["resume", "Resume", "SIGCONT"],
    ["transfer", "Lead", "ask the leader to hand leadership to this member (thesis §3.10)"],
    ["partition", "Cut off", "drop every message between this member and the others, both ways (a partition made in the members' transport)"],
    ["heal", "Heal", "end this member's partition"],
    ["promote", "Promote", "make this learner a voter (§6; refused until it has caught up)"],
    ["remove", "Remove", "remove this member from the configuration (§6); it stops by itself"],
  ];
  for (const name of state.members) {
    const row = el("div", { class: "control-row" }, box);
    el("span", { id: `state-${name}`, class: "who" }, row).textContent = name;
    for (const [action, label, help] of actions) {
      const b = el("button", { "data-action": action, "data-member": name, title: help }, row);
      b.textContent = label;
      b.addEventListener("click", () => control(action, name));
    }
  }
}

function drawControls() {
  for (const name of state.members) {
    const process = state.process.get(name) || "running";
    const role = roleOf(name);
    const allowed = {
      kill: process === "running" || process === "paused",
      restart: process === "killed" || process === "exited",
      pause: process === "running",
      resume: process === "paused",
      transfer: process === "running" && role === "follower" && !state.cutOff.has(name),
      partition: process === "running" && !state.cutOff.has(name),
      heal: state.cutOff.has(name),
      promote: process === "running" && role === "learner",
      remove: process !== "removed" && state.views.has(name) && state.members.filter((n) => state.process.get(n) !== "removed").length > 1,
    };
    for (const b of document.querySelectorAll(`button[data-member="${name}"]`)) {
      b.disabled = !allowed[b.dataset.action];
    }
    const label = $(`state-${name}`);
    if (label) label.textContent = `${name} (${role}${state.cutOff.has(name) ? ", cut off" : ""})`;
  }
}

function note(text, atMs = Date.now()) {
  const li = el("li");
  const time = el("time", {}, li);
  time.textContent = new Date(atMs).toLocaleTimeString();
  li.append(text);
  $("timeline").prepend(li);
  while ($("timeline").children.length > 200) $("timeline").lastChild.remove();
}

function noteChanges(name, before, v) {
  if (!before) return;
  if (before.role !== v.role) {
    if (v.role === "pre-candidate") note(`${name}'s election timer fired: it asks for pre-votes for term ${v.term + 1} (thesis §9.6)`);
    if (v.role === "candidate") note(`${name} starts an election: term ${v.term}, votes for itself (§5.2)`);
  }
  if (v.leader && !state.seenLeaders.has(`${v.term}|${v.leader}`)) {
    state.seenLeaders.add(`${v.term}|${v.leader}`);
    const voters = [...state.views].filter(([, e]) => e.view.term === v.term && e.view.vote === v.leader)
      .map(([n]) => n);
    note(`term ${v.term}: ${nameOf(v.leader)} leads` + (voters.length ? ` (votes seen from ${voters.join(", ")})` : "") + " (§5.2)");
  }
  const config = `${v.voters.join()}|${v.voters_outgoing.join()}|${v.learners.join()}`;
  if (config !== `${before.voters.join()}|${before.voters_outgoing.join()}|${before.learners.join()}`
      && !state.seenConfigs.has(config)) {
    state.seenConfigs.add(config);
    const joint = v.voters_outgoing.length ? ` (joint consensus with the old voters ${v.voters_outgoing.map(nameOf).join(", ")})` : "";
    note(`a new configuration, first seen by ${name}: voters ${v.voters.map(nameOf).join(", ")}` + joint +
      (v.learners.length ? `, learners ${v.learners.map(nameOf).join(", ")}` : "") + " (§6)");
  }
  if (v.snapshot_index > before.snapshot_index) {
    note(`${name} has a snapshot up to index ${v.snapshot_index}; the log before it is compacted (§7)`);
  }
  const lost = before.log_tail.filter((e) => e.index > before.commit &&
    v.log_tail.some((n) => n.index === e.index && n.term !== e.term));
  if (lost.length) {
    note(`${name}'s uncommitted entries ${lost.map((e) => e.index).join(", ")} were overwritten by the leader's (§5.3)`);
  }
}

function summary() {
  const leaders = state.members.filter((n) => roleOf(n) === "leader");
  const terms = [...state.views.values()].map((e) => e.view.term);
  const voters = leaders.length === 1 ? state.views.get(leaders[0]).view.voters.length : 0;
  $("summary").textContent = leaders.length === 1
    ? `leader ${leaders[0]}, term ${Math.max(...terms)}, ${voters} voters`
    : leaders.length === 0 ? "no leader" : `leaders: ${leaders.join(", ")}`;
}

function redraw() {
  state.members.forEach(drawMember);
  drawEdges();
  drawLogs();
  drawControls();
  summary();
}

// ----- Controls ------------------------------------------------------------------------------

async function control(action, member, params = {}) {
  const query = new URLSearchParams(action === "transfer" ? { to: member } : { member, ...params });
  if (action === "put" || action === "add-learner") query.delete("member");
  const status = $("status");
  try {
    const response = await fetch(`/api/${action}?${query}`, {
      method: "POST", headers: { "x-flotilla-dev": "1" },
    });
    status.textContent = await response.text();
  } catch (err) {
    status.textContent = `${action} failed: ${err}`;
  }
}

$("add-learner").addEventListener("click", () => control("add-learner", ""));

$("put").addEventListener("submit", (event) => {
  event.preventDefault();
  control("put", "", { key: $("put-key").value, value: $("put-value").value });
});

// ----- The tour ------------------------------------------------------------------------------

const TOUR = [
  "Watch a leader get elected (§5.2). Every member starts as a follower with a random election timeout: the ring. The first whose timer fires asks for pre-votes, then for votes in a new term; a majority makes it leader. Start dev with --slow-motion to follow it step by step.",
  "Heartbeats (§5.2). The leader sends heartbeats (grey dots) more often than any timeout. Each one resets a follower's ring, so nobody campaigns while the leader lives.",
  "Replicate an entry (§5.3). Put a key: the leader appends an entry of its term, and appends (blue dots) carry it to the followers. Once a majority holds it, it is committed: its box turns solid, and it is applied.",
  "Lose a minority (§5.3). Pause one follower and put again: the other two are a majority, so the entry commits without it. Resume it, and the leader brings its log up to date.",
  "Kill the leader (§5.2, §5.4). No heartbeats: the followers' rings fill, one campaigns in a higher term and wins. Only a member holding every committed entry can win (§5.4.1). Restart the old leader: it comes back a follower.",
];
let tourStep = 0;
function drawTour() {
  $("tour-step").textContent = `(${tourStep + 1} of ${TOUR.length})`;
  $("tour-text").textContent = TOUR[tourStep];
  $("tour-back").disabled = tourStep === 0;
  $("tour-next").disabled = tourStep === TOUR.length - 1;
}
$("tour-back").addEventListener("click", () => { tourStep--; drawTour(); });
$("tour-next").addEventListener("click", () => { tourStep++; drawTour(); });
drawTour();

// ----- The event stream -----------------------------------------------------------------------

const events = new EventSource("/events");
events.onopen = () => { $("connection").textContent = "live"; $("connection").className = "live"; };
events.onerror = () => { $("connection").textContent = "reconnecting…"; $("connection").className = ""; };
events.addEventListener("cluster", (e) => {
  const data = JSON.parse(e.data);
  state.slowMotion = data.slow_motion;
  if (data.members.join() !== state.members.join()) {
    state.members = data.members;
    buildCluster();
  }
  if (data.slow_motion) note("slow motion: heartbeats every 500 ms, elections after 5 to 10 s");
});
events.addEventListener("process", (e) => {
  const data = JSON.parse(e.data);
  state.process.set(data.name, data.state);
  if (data.cut_off) state.cutOff.add(data.name); else state.cutOff.delete(data.name);
  redraw();
});
events.addEventListener("note", (e) => {
  const data = JSON.parse(e.data);
  note(data.text, data.at_ms);
});
events.addEventListener("view", (e) => {
  const data = JSON.parse(e.data);
  const now = performance.now();
  const before = state.views.get(data.name);
  state.views.set(data.name, { view: data.view, at: now });
  if (state.process.get(data.name) !== "paused") state.process.set(data.name, "running");
  countMessages(data.name, data.view, now);
  noteChanges(data.name, before && before.view, data.view);
  redraw();
});
setInterval(() => drawRates(performance.now()), 250);
requestAnimationFrame(drawRings);
