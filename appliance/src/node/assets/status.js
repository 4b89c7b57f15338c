// The staff status page's refresh (appliance/src/node/status_page.rs). Every 2 s it fetches
// /status/view — the page's words, built on the appliance by the same code as the first paint —
// and puts them in place without reloading. It holds no words of its own: the "not answering"
// verdict comes from data attributes the server rendered.
"use strict";
(() => {
  const REFRESH_MS = 2000;
  const TIMEOUT_MS = 5000;
  const lang = document.documentElement.lang || "ko";
  const $ = (id) => document.getElementById(id);
  const verdict = $("verdict");
  const updated = $("updated");
  const brand = document.body.dataset.brand || "";
  const noAnswer = {
    state: "no_answer",
    title: verdict.dataset.noAnswerTitle,
    action: verdict.dataset.noAnswerAction,
  };
  let refreshes = 0;

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showVerdict(v) {
    verdict.className = "verdict v-" + v.state;
    verdict.dataset.state = v.state;
    $("verdict-title").textContent = v.title;
    $("verdict-action").textContent = v.action;
    document.title = v.title + " · " + brand;
  }

  function showFacts(facts) {
    const rows = facts.map((f) => {
      const row = el("div", "fact");
      row.dataset.fact = f.id;
      row.append(el("dt", "", f.label), el("dd", "", f.value));
      return row;
    });
    $("facts").replaceChildren(...rows);
  }

  function showDetails(details) {
    const rows = details.map((d) => {
      const row = el("div");
      row.append(el("dt", "", d.key), el("dd", "", d.value));
      return row;
    });
    $("details-list").replaceChildren(...rows);
  }

  async function refresh() {
    try {
      const r = await fetch("/status/view?lang=" + encodeURIComponent(lang), {
        cache: "no-store",
        headers: { accept: "application/json" },
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const view = await r.json();
      showVerdict(view.verdict);
      showFacts(view.facts);
      showDetails(view.details);
      document.body.classList.remove("stale");
      updated.textContent =
        updated.dataset.label + " " + new Date().toLocaleTimeString(lang);
    } catch (e) {
      showVerdict(noAnswer);
      document.body.classList.add("stale");
    } finally {
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
      setTimeout(refresh, REFRESH_MS);
    }
  }

  setTimeout(refresh, REFRESH_MS);
})();
