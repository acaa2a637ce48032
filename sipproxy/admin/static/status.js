// The live status page: asks api/status once a second and redraws every section from it.
// The JSON contract is the docstring of sipproxy/admin/status.py. Everything shown comes from
// the network (SIP URIs, user agents): it is set as text, never as HTML.
"use strict";

(function () {
  // Poll period (ms): the page is at most this far behind, plus one request.
  const PERIOD = 1000;
  // A request that takes longer is given up (and counted as a failure).
  const REQUEST_TIMEOUT = 5000;
  // A media direction with no packet for longer (s) is flagged silent (red). The kernel fast
  // path's counters are read every 2 s, so less would flag healthy kernel streams.
  const SILENT_AFTER = 3;

  // Relative to the page, so a reverse proxy may serve both under a prefix. With an [admin]
  // token the browser asked for it (basic auth) when it loaded the page and sends it along;
  // resolved against location.href, which has no user:password@ even when the address typed
  // had one (fetch refuses a URL with credentials, and a relative one would inherit them).
  const API = new URL("api/status", location.href).href;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  // 75 -> "1 min 15 s", 3725 -> "1 h 2 min", 4.2 -> "4 s"
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "\u2014";
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    s %= 60;
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + s + " s";
    return s + " s";
  }

  function bytes(n) {
    if (n < 1000) return n + " B";
    const units = ["kB", "MB", "GB", "TB"];
    let value = n;
    let unit = -1;
    do {
      value /= 1000;
      unit += 1;
    } while (value >= 1000 && unit < units.length - 1);
    return value.toFixed(value < 10 ? 1 : 0) + " " + units[unit];
  }

  function count(n) {
    return Number(n).toLocaleString("en-US");
  }

  function direction(text) {
    return String(text).replace("->", " \u2192 ");
  }

  function silent(stream, call) {
    const age = stream.last_packet_age;
    return (age === null || age === undefined ? call.duration : age) > SILENT_AFTER;
  }

  function mediaCell(call) {
    const box = el("div", "media");
    if (!call.media || call.media.length === 0) {
      // not answered yet (trying, ringing, answered): no media to show before the dialog
      box.append(el("span", "none", call.state === "established" ? "not relayed" : "\u2014"));
      return box;
    }
    for (const stream of call.media) {
      const quiet = silent(stream, call);
      const line = el("div", "stream" + (quiet ? " silent" : ""));
      line.dataset.direction = stream.direction;
      line.append(
        el("span", "direction", direction(stream.direction) + " " + (stream.media || "")),
        el("span", "packets num", count(stream.packets) + " packets"),
        el("span", "bytes num", bytes(stream.bytes)),
        el("span", "lost num", stream.lost === null || stream.lost === undefined
          ? "lost unknown" : count(stream.lost) + " lost"),
        el("span", "path", stream.path),
        el("span", "age num", stream.last_packet_age === null || stream.last_packet_age === undefined
          ? "no packet yet" : "last " + stream.last_packet_age.toFixed(1) + " s ago"),
      );
      if (quiet) line.append(el("span", "flag", "silent"));
      box.append(line);
    }
    return box;
  }

  // section id -> the cells of a row (text, or a node), one per column of its table
  const SECTIONS = {
    calls: (call) => [call.from, call.to, call.state, duration(call.duration), mediaCell(call)],
    registrations: (r) => [
      r.aor, r.contact, r.source || "unknown", (r.transport || "").toUpperCase(),
      duration(r.expires_in), r.user_agent || "\u2014",
    ],
    bans: (b) => [b.source, b.reason, duration(b.time_left)],
    listeners: (l) => [
      (l.transport || "").toUpperCase(), hostPort(l.address, l.port), l.side || "\u2014",
      l.advertised || "the route\u2019s address toward each peer",
    ],
  };

  function hostPort(host, port) {
    return (String(host).includes(":") ? "[" + host + "]" : host) + ":" + port;
  }

  function fillTable(id, rows) {
    const section = document.getElementById(id);
    const heads = Array.from(section.querySelectorAll("thead th"));
    const body = section.querySelector("tbody");
    const out = [];
    for (const row of rows) {
      const tr = el("tr");
      SECTIONS[id](row).forEach((value, i) => {
        const td = el("td", heads[i].className);
        td.dataset.label = heads[i].textContent;
        if (value instanceof Node) td.append(value);
        else td.textContent = value === null || value === undefined ? "" : String(value);
        tr.append(td);
      });
      out.push(tr);
    }
    body.replaceChildren(...out);
    mark(section, rows.length);
  }

  function mark(section, n) {
    section.classList.toggle("has-rows", n > 0);
    section.querySelector(".count").textContent = "(" + n + ")";
  }

  // A plugin's own status section: keys the page does not know, shown as a generic table
  // (nested objects as nested tables, lists of objects as tables with a column per key).
  function generic(value, depth) {
    if (value === null || value === undefined) return el("span", "none", "\u2014");
    if (typeof value !== "object" || depth > 4) {
      return el("span", "", typeof value === "object" ? JSON.stringify(value) : value);
    }
    if (Array.isArray(value)) {
      if (value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
        const keys = Array.from(new Set(value.flatMap(Object.keys)));
        const table = el("table");
        const head = el("tr");
        keys.forEach((k) => head.append(el("th", "", k)));
        table.append(head);
        for (const item of value) {
          const tr = el("tr");
          for (const k of keys) tr.append(cell(generic(item[k], depth + 1)));
          table.append(tr);
        }
        return table;
      }
      return el("span", "", value.map((v) => (typeof v === "object" ? JSON.stringify(v) : v))
        .join(", ") || "\u2014");
    }
    const table = el("table");
    for (const [k, v] of Object.entries(value)) {
      const tr = el("tr");
      tr.append(el("th", "", k), cell(generic(v, depth + 1)));
      table.append(tr);
    }
    return table;
  }

  function cell(node) {
    const td = el("td");
    td.append(node);
    return td;
  }

  function fillPlugins(plugins) {
    const section = document.getElementById("plugins");
    const cards = plugins.map((p) => {
      const card = el("div", "plugin");
      card.append(el("h3", "", p.name));
      if (p.status && Object.keys(p.status).length) card.append(generic(p.status, 0));
      else card.append(el("span", "none", "no status"));
      return card;
    });
    section.querySelector(".plugins").replaceChildren(...cards);
    mark(section, plugins.length);
  }

  function render(status) {
    for (const id of Object.keys(SECTIONS)) fillTable(id, status[id] || []);
    fillPlugins(status.plugins || []);
    const calls = (status.calls || []).length;
    document.getElementById("summary").textContent = [
      plural((status.registrations || []).length, "registration", "registrations"),
      plural(calls, "call", "calls"),
      plural((status.bans || []).length, "ban", "bans"),
    ].join(" \u00b7 ");
    document.title = "sipproxy: " + plural(calls, "call", "calls");
  }

  const connection = document.getElementById("connection");

  function connected(ok, text) {
    connection.classList.toggle("offline", !ok);
    connection.textContent = text;
  }

  async function poll() {
    const started = Date.now();
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT);
    let answered = false;
    try {
      const response = await fetch(API, {cache: "no-store", signal: abort.signal});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const status = await response.json();
      answered = true;
      render(status);
      connected(true, "live \u00b7 updated " + new Date().toLocaleTimeString());
    } catch (error) {
      const why = error.name === "AbortError" ? "no answer" : error.message;
      connected(false, answered ? "cannot show the proxy's answer (" + why + ")"
        : "offline (" + why + "), retrying");
    } finally {
      clearTimeout(timer);
      setTimeout(poll, Math.max(0, PERIOD - (Date.now() - started)));
    }
  }

  poll();
})();
