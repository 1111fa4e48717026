// page.html at /guidelines and at /review (reviewers only). Both use the token the ranking page stored; all text
// goes on the page through common.js (textContent only).
"use strict";

(() => {
  const { request, el, markdown, transcript } = window.instructrl;
  const content = document.getElementById("content");
  const say = (text) => { document.getElementById("status").textContent = text; };
  const fmt = (x) => (x === null || x === undefined ? "–" : x.toFixed(2));
  const group = (g) => (Array.isArray(g) ? g : [g]);
  const LOW = 0.5;  // agreement below this is highlighted

  function refused(status, data) {
    if (status === 401) say("Log in on the ranking page first (your token is not set or not accepted).");
    else say(`Could not load (${status}): ${data && typeof data.detail === "string" ? data.detail : ""}`);
  }

  async function guidelines() {
    const { status, data } = await request("GET", "/api/guidelines");
    if (status !== 200) return refused(status, data);
    content.replaceChildren(data.markdown === null
      ? el("p", "", "This project has no guidelines (start the server with --guidelines FILE.md).")
      : markdown(data.markdown));
  }

  // A ranking as "1 > 3 = 2" (1-based positions in the stored order).
  const rankingText = (r) => r.map((g) => group(g).map((i) => i + 1).join(" = ")).join(" > ");

  function taskRow(t) {
    const row = el("tr");
    row.append(el("td", "num", String(t.task_id)));
    const agree = el("td", "num" + (t.agreement !== null && t.agreement < LOW ? " low" : ""), fmt(t.agreement));
    row.append(agree, el("td", "num", fmt(t.kendall_tau)));
    row.append(el("td", "", Object.entries(t.flags).map(([k, n]) => `${k} ${n}`).join(", ") || "–"));
    const prompt = el("td");
    prompt.append(transcript(t.prompt));
    row.append(prompt);
    const cons = el("td");
    if (t.consensus.length < 2) cons.append(el("div", "low", "all tied: left out of the exports"));
    const list = el("ul", "consensus");
    t.consensus.forEach((g, rank) => group(g).forEach((i) => {
      const item = el("li");
      item.append(el("span", "model", `${rank + 1}${group(g).length > 1 ? " (tie)" : ""} · response #${i + 1}`
        + ` · mean rank ${t.mean_ranks[i].toFixed(2)}` + (t.models ? ` · ${t.models[i]}` : "")));
      item.append(transcript(t.responses[i]));
      list.append(item);
    }));
    cons.append(list);
    row.append(cons);
    const who = el("td");
    t.labelers.forEach((name, k) => who.append(el("div", "", `${name}: ${rankingText(t.rankings[k])}`)));
    row.append(who);
    return row;
  }

  async function review() {
    const { status, data } = await request("GET", "/api/review");
    if (status !== 200) return refused(status, data);
    const people = el("table", "review");
    people.append(el("caption", "", "Labelers (agreement with the others on shared tasks)"));
    const head = el("tr");
    ["labeler", "rankings", "pair agreement", "in exports"]
      .forEach((h, k) => head.append(el("th", k === 1 || k === 2 ? "num" : "", h)));
    people.append(head);
    for (const l of data.labelers) {
      const row = el("tr");
      row.append(el("td", l.excluded ? "excluded" : "", l.name), el("td", "num", String(l.rankings)),
                 el("td", "num", fmt(l.pairwise_agreement)),
                 el("td", "", l.excluded ? "no (label include NAME)" : "yes (label exclude NAME)"));
      people.append(row);
    }
    const tasks = el("table", "review");
    tasks.append(el("caption", "", `${data.tasks.length} ranked tasks, least agreement first`));
    const th = el("tr");
    ["task", "agreement", "Kendall τ", "flags", "prompt", "consensus (best first)", "rankings"]
      .forEach((h, k) => th.append(el("th", k < 3 ? "num" : "", h)));
    tasks.append(th);
    data.tasks.forEach((t) => tasks.append(taskRow(t)));
    content.replaceChildren(people, tasks);
  }

  const isReview = window.location.pathname === "/review";
  document.getElementById("title").textContent = isReview ? "Review: tasks by agreement" : "Labeling guidelines";
  document.title = "instructrl · " + (isReview ? "review" : "guidelines");
  (isReview ? review() : guidelines()).catch(() => say("Cannot reach the server."));
})();
