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

  // ---- start -------------------------------------------------------------------------------

  async function start() {
    $("lang-switch").addEventListener("click", switchLang);
    $("logout").addEventListener("click", logout);
    $("login-form").addEventListener("submit", login);
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
