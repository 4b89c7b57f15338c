// The booth console (cloud-relay/src/console/mod.rs). Plain JavaScript, no build step, no
// dependencies: the content-security-policy allows only this file, so nothing here may create
// inline script or style, and every string shown comes from i18n/<lang>.json through t().
"use strict";

(() => {
  const LANGS = ["ko", "en"];
  const LANG_KEY = "comatching.console.lang"; // localStorage: the language persists
  const TOKEN_KEY = "comatching.console.token"; // sessionStorage: the tab's session only
  const USER_KEY = "comatching.console.username";
  const BOARD_EVERY_MS = 3000;

  const $ = (id) => document.getElementById(id);

  let lang = "ko";
  let table = {};
  let boardTimer = null;
  let lastBoard = null; // {stats, appliances, at}
  let boardFailing = false;

  // ---- strings -------------------------------------------------------------------------

  function t(key, vars) {
    let s = Object.prototype.hasOwnProperty.call(table, key) ? table[key] : key;
    if (vars) {
      for (const [k, v] of Object.entries(vars)) {
        s = s.split("{" + k + "}").join(String(v));
      }
    }
    return s;
  }

  function num(n) {
    return new Intl.NumberFormat(lang === "ko" ? "ko-KR" : "en-US").format(n);
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString(lang === "ko" ? "ko-KR" : "en-GB", {
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  }

  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 90) return t("ago_seconds", { n: s });
    if (s < 90 * 60) return t("ago_minutes", { n: Math.round(s / 60) });
    return t("ago_hours", { n: Math.round(s / 3600) });
  }

  function savedLang() {
    try {
      const l = localStorage.getItem(LANG_KEY);
      return LANGS.includes(l) ? l : "ko";
    } catch (_) {
      return "ko";
    }
  }

  async function loadLang(l) {
    const r = await fetch("/console/i18n/" + l + ".json", { cache: "no-cache" });
    if (!r.ok) throw new Error("i18n " + l + ": " + r.status);
    table = await r.json();
    lang = l;
  }

  function applyStrings() {
    document.documentElement.lang = lang;
    document.title = t("title");
    for (const e of document.querySelectorAll("[data-i18n]")) e.textContent = t(e.dataset.i18n);
    for (const e of document.querySelectorAll("[data-i18n-title]")) e.title = t(e.dataset.i18nTitle);
    const who = sessionStorage.getItem(USER_KEY);
    $("who").textContent = who ? t("signed_in_as", { username: who }) : "";
    if (lastBoard) renderBoard();
    $("lookup-q").placeholder = t("lookup_placeholder");
    renderQueue();
    renderStream();
  }

  async function switchLang() {
    const next = lang === "ko" ? "en" : "ko";
    try {
      await loadLang(next);
    } catch (_) {
      return;
    }
    try {
      localStorage.setItem(LANG_KEY, next);
    } catch (_) {
      // Private mode without storage: the switch still works for this page.
    }
    applyStrings();
  }

  // ---- the relay's API -------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message || code || String(status));
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "network", String(e));
    }
    let data = null;
    if (r.status !== 204) {
      try {
        data = await r.json();
      } catch (_) {
        data = null;
      }
    }
    if (!r.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(r.status, err.code || "http_" + r.status, err.message);
    }
    return data;
  }

  function describe(e) {
    if (!(e instanceof ApiError)) return t("err_other", { message: String(e) });
    if (e.status === 0) return t("err_network");
    if (e.code === "rate_limited") return t("err_rate_limited");
    return t("err_other", { message: e.message });
  }

  // ---- views -------------------------------------------------------------------------------

  function show(view) {
    $("booting").hidden = true;
    $("login-view").hidden = view !== "login";
    $("board-view").hidden = view !== "board";
    $("queue-view").hidden = view !== "board";
    $("lookup-view").hidden = view !== "board";
    const signedIn = view !== "login";
    $("logout").hidden = !signedIn;
    $("who").hidden = !signedIn;
    document.body.dataset.view = view;
  }

  function loginError(text) {
    const p = $("login-error");
    p.textContent = text;
    p.hidden = !text;
  }

  function forget() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(USER_KEY);
    lastBoard = null;
    if (boardTimer) clearTimeout(boardTimer);
    boardTimer = null;
    stopStream();
    $("lookup-results").replaceChildren();
    lookupStatus("", false);
  }

  function toLogin(message) {
    forget();
    applyStrings();
    show("login");
    loginError(message || "");
    $("password").value = "";
    $("username").focus();
  }

  async function login(ev) {
    ev.preventDefault();
    const username = $("username").value.trim().toLowerCase();
    const password = $("password").value;
    if (!username || !password) {
      loginError(t("err_fields_required"));
      return;
    }
    const button = $("login-button");
    button.disabled = true;
    button.textContent = t("logging_in");
    loginError("");
    try {
      const s = await api("POST", "/api/v1/sessions", { username, password });
      sessionStorage.setItem(TOKEN_KEY, s.token);
      sessionStorage.setItem(USER_KEY, username);
      // The operator routes answer 403 to anyone else: ask one before showing anything.
      const ok = await checkOperator(username);
      if (ok) await enterBoard();
    } catch (e) {
      forget();
      if (e instanceof ApiError && (e.code === "unauthorized" || e.code === "validation_failed")) {
        loginError(t("err_wrong_credentials"));
      } else {
        loginError(describe(e));
      }
    } finally {
      button.disabled = false;
      button.textContent = t("login");
    }
  }

  /// True for an operator. Anyone else: their new session is ended at once (a student's token
  /// has no business sitting in the booth laptop) and the login form says why.
  async function checkOperator(username) {
    try {
      await api("GET", "/api/v1/admin/stats");
      return true;
    } catch (e) {
      if (e instanceof ApiError && e.code === "forbidden") {
        try {
          await api("DELETE", "/api/v1/sessions/current");
        } catch (_) {
          // Ending it is a courtesy; the token is forgotten either way.
        }
        toLogin(t("err_not_operator", { username }));
        return false;
      }
      throw e;
    }
  }

  async function logout() {
    try {
      await api("DELETE", "/api/v1/sessions/current");
    } catch (_) {
      // Already gone or the relay is away: forgetting the token is what matters here.
    }
    toLogin("");
  }

  /// A 401 or 403 from any operator route ends the console's session.
  function sessionProblem(e) {
    if (!(e instanceof ApiError)) return false;
    if (e.code === "unauthorized") {
      toLogin(t("err_session_ended"));
      return true;
    }
    if (e.code === "forbidden") {
      toLogin(t("err_not_operator", { username: sessionStorage.getItem(USER_KEY) || "" }));
      return true;
    }
    return false;
  }

  // ---- festival board ----------------------------------------------------------------------

  function startOfToday() {
    const d = new Date();
    d.setHours(0, 0, 0, 0);
    return d.getTime();
  }

  async function enterBoard() {
    applyStrings();
    show("board");
    startStream();
    await refreshBoard();
  }

  async function refreshBoard() {
    if (boardTimer) clearTimeout(boardTimer);
    boardTimer = null;
    try {
      const [stats, appliances] = await Promise.all([
        api("GET", "/api/v1/admin/stats?since_ms=" + startOfToday()),
        api("GET", "/api/v1/admin/appliances"),
      ]);
      lastBoard = { stats, appliances, at: Date.now() };
      boardFailing = false;
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    } catch (e) {
      if (sessionProblem(e)) return;
      boardFailing = true;
    }
    if (!sessionStorage.getItem(TOKEN_KEY)) return;
    renderBoard();
    boardTimer = setTimeout(refreshBoard, BOARD_EVERY_MS);
  }

  function renderBoard() {
    const status = $("board-status");
    if (!lastBoard) {
      status.textContent = boardFailing ? t("err_network") : t("loading");
      status.classList.toggle("bad", boardFailing);
      return;
    }
    status.textContent = boardFailing
      ? t("board_stale", { time: clock(lastBoard.at) })
      : t("updated_at", { time: clock(lastBoard.at) });
    status.classList.toggle("bad", boardFailing);
    const s = lastBoard.stats;
    const values = {
      users: s.users,
      profiles: s.profiles,
      matches_today: s.matches_since,
      points_granted: s.points_granted,
      points_spent: s.points_spent,
      open_holds: s.open_holds,
    };
    for (const tile of document.querySelectorAll("#tiles .tile")) {
      const v = values[tile.dataset.stat];
      tile.querySelector("dd").textContent = typeof v === "number" ? num(v) : "–";
    }
    const list = $("appliances");
    const rows = (lastBoard.appliances && lastBoard.appliances.appliances) || [];
    list.replaceChildren(...rows.map(applianceRow));
    $("no-appliances").hidden = rows.length > 0;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function applianceRow(a) {
    const li = el("li", "appliance " + (a.ready ? "ready" : "not-ready"));
    li.dataset.appliance = a.appliance_id;
    li.dataset.ready = a.ready ? "true" : "false";
    li.append(
      el("span", "badge", a.ready ? t("appliance_ready") : t("appliance_not_ready")),
      el("span", "name", a.appliance_id),
      el("span", "lag", a.lag > 0 ? t("appliance_behind", { n: num(a.lag) }) : t("appliance_in_step")),
      el("span", "count", t("appliance_students", { n: num(a.count) })),
      el("span", "seen", t("last_seen", { ago: ago(Date.now() - a.last_seen_unix_ms) })),
    );
    return li;
  }


  // ---- pending charges, live ----------------------------------------------------------------
  //
  // EventSource cannot send an Authorization header, so the stream is read with fetch() and a
  // ReadableStream, parsed here (text/event-stream: lines `field: value`, events end at a blank
  // line). After a drop it reconnects with backoff and `Last-Event-ID`; the relay replays what
  // was missed, or says `resync` and the list is loaded again.

  const NEW_FOR_MS = 10000;
  const queue = new Map(); // charge_id → charge (pending only)
  const gone = new Set(); // charge ids decided or cancelled since the list was asked for
  const firstSeen = new Map(); // charge_id → when this console first showed it
  let stream = null; // {abort: AbortController}
  let lastEventId = null;
  let streamState = "connecting";
  let retryInS = 0;
  let backoffMs = 500;
  let ageTimer = null;
  let listLoaded = false;
  const sinceLoad = new Set(); // charge ids created on the stream while the list was loading

  function stopStream() {
    if (stream) stream.abort.abort();
    stream = null;
    lastEventId = null;
    queue.clear();
    gone.clear();
    sinceLoad.clear();
    firstSeen.clear();
    listLoaded = false;
    if (ageTimer) clearInterval(ageTimer);
    ageTimer = null;
  }

  function startStream() {
    stopStream();
    ageTimer = setInterval(renderQueue, 1000);
    connect();
  }

  async function connect() {
    const me = { abort: new AbortController() };
    stream = me;
    streamState = "connecting";
    renderStream();
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) return;
    const headers = { Accept: "text/event-stream", Authorization: "Bearer " + token };
    if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
    try {
      const r = await fetch("/api/v1/admin/charges/events", {
        headers, cache: "no-store", credentials: "omit", signal: me.abort.signal,
      });
      if (!r.ok) {
        let code = "http_" + r.status;
        try {
          code = (await r.json()).error.code || code;
        } catch (_) {
          // keep the status
        }
        const e = new ApiError(r.status, code, code);
        if (sessionProblem(e)) return;
        throw e;
      }
      await readEvents(r.body.getReader(), me);
    } catch (_) {
      // A drop, a relay restart, or our own abort: retry below unless this stream is over.
    }
    if (stream !== me || !sessionStorage.getItem(TOKEN_KEY)) return;
    retryInS = Math.ceil(backoffMs / 1000);
    streamState = "retrying";
    renderStream();
    setTimeout(() => {
      if (stream === me) connect();
    }, backoffMs);
    backoffMs = Math.min(backoffMs * 2, 8000);
  }

  async function readEvents(reader, me) {
    const decoder = new TextDecoder();
    let buf = "";
    let ev = { event: "message", data: [], id: null };
    for (;;) {
      const { value, done } = await reader.read();
      if (done || stream !== me) return;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") {
          if (ev.id !== null) lastEventId = ev.id;
          if (ev.data.length) await onEvent(ev.event, ev.data.join("\n"));
          ev = { event: "message", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") ev.event = val;
        else if (field === "data") ev.data.push(val);
        else if (field === "id") ev.id = val;
      }
    }
  }

  async function onEvent(kind, data) {
    let body;
    try {
      body = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (kind === "ready") {
      streamState = "live";
      backoffMs = 500;
      if (lastEventId === null && body.last_event_id !== undefined) {
        lastEventId = String(body.last_event_id);
      }
      renderStream();
      if (!listLoaded) await loadQueue();
    } else if (kind === "resync") {
      await loadQueue();
    } else if (kind === "charge.created" && body.charge) {
      if (body.charge.status === "pending" && !gone.has(body.charge.charge_id)) {
        queue.set(body.charge.charge_id, body.charge);
        sinceLoad.add(body.charge.charge_id);
      }
    } else if ((kind === "charge.decided" || kind === "charge.cancelled") && body.charge) {
      gone.add(body.charge.charge_id);
      queue.delete(body.charge.charge_id);
    }
    renderQueue();
  }

  /// The pending list, oldest first, after the stream has said where it starts: events after
  /// that position arrive on the stream, so nothing falls between the two.
  async function loadQueue() {
    const fresh = new Map();
    sinceLoad.clear();
    let cursor = null;
    try {
      for (let page = 0; page < 20; page++) {
        const q = "/api/v1/admin/charges?status=pending&limit=100" +
          (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
        const r = await api("GET", q);
        for (const c of r.charges) fresh.set(c.charge_id, c);
        cursor = r.next_cursor;
        if (!cursor) break;
      }
    } catch (e) {
      if (!sessionProblem(e)) listLoaded = false;
      return;
    }
    for (const id of [...queue.keys()]) {
      if (!fresh.has(id) && !sinceLoad.has(id)) queue.delete(id);
    }
    for (const [id, c] of fresh) {
      if (gone.has(id)) continue;
      // Waiting before this console looked is not "new"; a resync keeps what it showed.
      if (!listLoaded && !firstSeen.has(id)) firstSeen.set(id, 0);
      queue.set(id, c);
    }
    listLoaded = true;
    document.body.dataset.queueLoaded = "true";
    renderQueue();
  }

  function renderStream() {
    const p = $("stream-status");
    if (!p) return;
    p.dataset.state = streamState;
    p.classList.toggle("bad", streamState === "retrying");
    p.textContent = streamState === "live" ? t("stream_live")
      : streamState === "retrying" ? t("stream_retrying", { s: retryInS })
        : t("stream_connecting");
  }

  function renderQueue() {
    const list = $("queue");
    if (!list) return;
    const now = Date.now();
    const items = [...queue.values()].sort((a, b) =>
      a.created_at_unix_ms - b.created_at_unix_ms || (a.charge_id < b.charge_id ? -1 : 1));
    const keep = new Set(items.map((c) => c.charge_id));
    for (const li of [...list.children]) {
      if (!keep.has(li.dataset.charge)) li.remove();
    }
    let prev = null;
    for (const c of items) {
      if (!firstSeen.has(c.charge_id)) firstSeen.set(c.charge_id, listLoaded ? now : 0);
      let li = list.querySelector("[data-charge=\"" + c.charge_id + "\"]");
      if (!li) li = chargeRow(c);
      const fresh = now - firstSeen.get(c.charge_id) < NEW_FOR_MS;
      li.classList.toggle("new", fresh);
      li.querySelector(".flag").hidden = !fresh;
      li.querySelector(".flag").textContent = t("charge_new");
      li.querySelector(".age").textContent =
        t("charge_age", { ago: ago(now - c.created_at_unix_ms) });
      li.querySelector(".depositor").textContent = t("charge_depositor", { name: c.depositor });
      li.querySelector(".approve").textContent = t("approve");
      li.querySelector(".reject").textContent = t("reject");
      const want = prev ? prev.nextSibling : list.firstChild;
      if (want !== li) list.insertBefore(li, want);
      prev = li;
    }
    document.body.dataset.queue = String(items.length);
    $("queue-empty").hidden = items.length > 0 || !listLoaded;
  }

  function chargeRow(c) {
    const li = el("li", "charge");
    li.dataset.charge = c.charge_id;
    li.dataset.username = c.username;
    const approve = el("button", "approve");
    approve.type = "button";
    approve.addEventListener("click", () => decide(c, "approve", null, li));
    const reject = el("button", "reject");
    reject.type = "button";
    reject.addEventListener("click", () => askReason(c, li));
    const buttons = el("span", "buttons");
    buttons.append(approve, reject);
    li.append(
      el("span", "flag"),
      el("span", "amount", num(c.amount)),
      el("span", "who", c.username),
      el("span", "depositor"),
      el("span", "age"),
      buttons,
    );
    return li;
  }

  function askReason(c, li) {
    if (li.querySelector(".reject-form")) return;
    const form = el("form", "reject-form");
    form.noValidate = true;
    const input = el("input", "reason");
    input.maxLength = 200;
    input.placeholder = t("reject_reason");
    input.setAttribute("aria-label", t("reject_reason"));
    const ok = el("button", "reject-confirm", t("reject_confirm"));
    ok.type = "submit";
    const cancel = el("button", "reject-cancel", t("cancel"));
    cancel.type = "button";
    cancel.addEventListener("click", () => form.remove());
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const reason = input.value.trim();
      if (!reason) {
        result(t("err_reason_required"), true);
        input.focus();
        return;
      }
      decide(c, "reject", reason, li);
    });
    form.append(input, ok, cancel);
    li.append(form);
    input.focus();
  }

  function result(text, bad) {
    const p = $("queue-result");
    p.textContent = text;
    p.hidden = !text;
    p.classList.toggle("bad", !!bad);
  }

  async function decide(c, action, reason, li) {
    for (const b of li.querySelectorAll("button")) b.disabled = true;
    try {
      const body = action === "reject" ? { reason } : undefined;
      const r = await api("POST", "/api/v1/admin/charges/" + c.charge_id + "/" + action, body);
      gone.add(c.charge_id);
      queue.delete(c.charge_id);
      const vars = { username: c.username, amount: num(c.amount), points: num(r.points || 0) };
      result(action === "approve" ? t("result_approved", vars) : t("result_rejected", vars), false);
    } catch (e) {
      if (sessionProblem(e)) return;
      if (e instanceof ApiError && e.code === "charge_decided") {
        gone.add(c.charge_id);
        queue.delete(c.charge_id);
        result(t("result_decided_elsewhere"), true);
      } else {
        result(describe(e), true);
      }
    } finally {
      for (const b of li.querySelectorAll("button")) b.disabled = false;
    }
    renderQueue();
  }


  // ---- student look-up and direct grants ---------------------------------------------------

  function lookupStatus(text, bad) {
    const p = $("lookup-status");
    p.textContent = text;
    p.hidden = !text;
    p.classList.toggle("bad", !!bad);
  }

  // Students whose recent points history is shown. A look-up of one student shows it at once;
  // with several, each line has a button (a history per line would spend the operator's
  // per-minute request budget on a broad prefix). A grant opens the student's history.
  const historyShown = new Set();

  async function lookup(keepStatus) {
    const q = $("lookup-q").value.trim().toLowerCase();
    if (!/^[a-z0-9_]{1,32}$/.test(q)) {
      lookupStatus(t("err_lookup_q"), true);
      return;
    }
    let r;
    try {
      r = await api("GET", "/api/v1/admin/users?q=" + encodeURIComponent(q));
    } catch (e) {
      if (!sessionProblem(e)) lookupStatus(describe(e), true);
      return;
    }
    if (!keepStatus) {
      historyShown.clear();
      lookupStatus(r.users.length ? "" : t("lookup_none", { q }), false);
    }
    if (r.users.length === 1) historyShown.add(r.users[0].user_id);
    const rows = r.users.map(userRow);
    $("lookup-results").replaceChildren(...rows);
    document.body.dataset.lookups = String(Number(document.body.dataset.lookups || 0) + 1);
    await Promise.all(
      r.users.map((u, i) => (historyShown.has(u.user_id) ? showHistory(u, rows[i]) : null)),
    );
  }

  /// Month, day, hours and minutes in the console's language.
  function stamp(ms) {
    return new Date(ms).toLocaleString(lang === "ko" ? "ko-KR" : "en-GB", {
      month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
    });
  }

  function signed(n) {
    return (n > 0 ? "+" : n < 0 ? "−" : "") + num(Math.abs(n));
  }

  function ledgerWhat(e) {
    if (e.kind === "match") {
      return e.refunded ? t("ledger_match_refunded", { n: num(e.refunded) }) : t("ledger_match");
    }
    return e.charge_id ? t("ledger_charge") : t("ledger_grant", { reason: e.reason || "" });
  }

  function ledgerRow(e) {
    const li = el("li", "entry " + e.kind);
    li.append(
      el("span", "when", stamp(e.created_at_unix_ms)),
      el("span", "what", ledgerWhat(e)),
      el("span", "amount", signed(e.amount)),
      el("span", "after", t("ledger_after", { n: num(e.balance_after) })),
    );
    return li;
  }

  /// Loads and shows the student's last five ledger entries on their line.
  async function showHistory(u, li) {
    historyShown.add(u.user_id);
    const box = li.querySelector(".history");
    const toggle = li.querySelector("button.history-toggle");
    toggle.setAttribute("aria-expanded", "true");
    toggle.textContent = t("history_hide");
    box.hidden = false;
    box.replaceChildren(el("p", "status", t("loading")));
    let r;
    try {
      r = await api("GET", "/api/v1/admin/users/" + u.user_id + "/ledger?limit=5");
    } catch (e) {
      if (sessionProblem(e)) return;
      const p = el("p", "status bad", e.code === "not_found" ? t("history_gone") : describe(e));
      box.replaceChildren(p);
      return;
    }
    if (!historyShown.has(u.user_id)) return; // hidden again meanwhile
    const title = el("h3", "history-title", t("history_title"));
    if (!r.entries.length) {
      box.replaceChildren(title, el("p", "status", t("history_none")));
    } else {
      const ol = el("ol", "ledger");
      ol.append(...r.entries.map(ledgerRow));
      box.replaceChildren(title, ol);
    }
    li.dataset.history = String(r.entries.length);
  }

  function hideHistory(u, li) {
    historyShown.delete(u.user_id);
    const box = li.querySelector(".history");
    const toggle = li.querySelector("button.history-toggle");
    toggle.setAttribute("aria-expanded", "false");
    toggle.textContent = t("history_show");
    box.hidden = true;
    box.replaceChildren();
    delete li.dataset.history;
  }

  function userRow(u) {
    const li = el("li", "user");
    li.dataset.username = u.username;
    const pending = u.pending_charge
      ? t("user_pending", { n: num(u.pending_charge.amount) })
      : t("user_no_pending");
    const form = el("form", "grant-form");
    form.noValidate = true;
    const amount = el("input", "amount");
    amount.type = "number";
    amount.min = "1";
    amount.max = "1000000";
    amount.step = "1";
    amount.placeholder = t("grant_amount");
    amount.setAttribute("aria-label", t("grant_amount"));
    const reason = el("input", "reason");
    reason.maxLength = 200;
    reason.placeholder = t("grant_reason");
    reason.setAttribute("aria-label", t("grant_reason"));
    const go = el("button", "grant", t("grant"));
    go.type = "submit";
    form.append(amount, reason, go);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      grant(u, amount.value, reason.value);
    });
    const toggle = el("button", "history-toggle", t("history_show"));
    toggle.type = "button";
    toggle.setAttribute("aria-expanded", "false");
    toggle.addEventListener("click", () => {
      if (historyShown.has(u.user_id)) hideHistory(u, li);
      else showHistory(u, li);
    });
    const box = el("div", "history");
    box.hidden = true;
    li.append(
      el("span", "name", u.username),
      el("span", "points", t("user_points", { n: num(u.points) })),
      el("span", "pending", pending),
      el("span", "matches", t("user_matches", { n: num(u.matches) })),
      toggle,
      form,
      box,
    );
    return li;
  }

  /// Asks in a dialog naming the student and the amount; resolves true on "grant".
  function confirmGrant(username, amount, reason) {
    const d = $("grant-dialog");
    $("grant-dialog-text").textContent =
      t("grant_confirm_text", { username, amount: num(amount), reason });
    return new Promise((resolve) => {
      d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
      d.returnValue = "";
      d.showModal();
    });
  }

  async function grant(u, amountText, reasonText) {
    const username = u.username;
    const amount = Number(amountText);
    const reason = reasonText.trim();
    if (!Number.isInteger(amount) || amount < 1 || amount > 1000000) {
      lookupStatus(t("err_grant_amount"), true);
      return;
    }
    if (!reason) {
      lookupStatus(t("err_grant_reason"), true);
      return;
    }
    if (!(await confirmGrant(username, amount, reason))) return;
    try {
      const r = await api("POST", "/api/v1/admin/points", { username, amount, reason });
      lookupStatus(t("result_granted", { username, amount: num(amount), points: num(r.points) }), false);
    } catch (e) {
      if (!sessionProblem(e)) lookupStatus(describe(e), true);
      return;
    }
    historyShown.add(u.user_id); // the grant just made, on its line
    await lookup(true);
  }

  // ---- start -------------------------------------------------------------------------------

  async function start() {
    $("lang-switch").addEventListener("click", switchLang);
    $("logout").addEventListener("click", logout);
    $("login-form").addEventListener("submit", login);
    $("grant-dialog-ok").addEventListener("click", () => $("grant-dialog").close("ok"));
    $("grant-dialog-cancel").addEventListener("click", () => $("grant-dialog").close("cancel"));
    $("lookup-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      lookup();
    });
    try {
      await loadLang(savedLang());
    } catch (_) {
      await loadLang("ko");
    }
    applyStrings();
    document.documentElement.classList.remove("booting");
    if (!sessionStorage.getItem(TOKEN_KEY)) {
      toLogin("");
      return;
    }
    try {
      const username = sessionStorage.getItem(USER_KEY) || "";
      if (await checkOperator(username)) await enterBoard();
    } catch (e) {
      if (!sessionProblem(e)) {
        // The relay is away: show the board; it says so and keeps retrying.
        await enterBoard();
      }
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
