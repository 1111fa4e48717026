// The labeling page. It talks only to /api, and puts model text on the page through common.js's renderer, which
// builds elements with textContent alone: responses are untrusted, and must never be parsed as HTML.
"use strict";

(() => {
  const { TOKEN_KEY, request, transcript } = window.instructrl;
  const $ = (id) => document.getElementById(id);
  const list = $("responses");
  let task = null;       // the task on screen: {id, prompt, responses}
  let selected = null;   // the <li> chosen with a number key or a click
  let dragged = null;    // the <li> being dragged
  let busy = false;      // a submit or skip is in flight: ignore repeats

  // --- talking to the API -------------------------------------------------------------------------------
  async function api(method, path, body) {
    const answer = await request(method, path, body);
    if (answer.status === 401) {
      showLogin("That token was not accepted. Check it and try again.");
      throw new Error("unauthorized");
    }
    return answer;
  }

  function detailText(data) {
    if (!data || data.detail === undefined) return "";
    if (typeof data.detail === "string") return data.detail;
    return data.detail.map((d) => d.msg).join("; ");
  }

  function say(message, isError) {
    $("status").textContent = message;
    $("status").classList.toggle("error", !!isError);
  }

  // --- screens ------------------------------------------------------------------------------------------
  function showLogin(message) {
    localStorage.removeItem(TOKEN_KEY);
    $("login").hidden = false;
    $("work").hidden = true;
    $("logout").hidden = true;
    $("whoami").textContent = "";
    $("progress").textContent = "";
    say(message || "", !!message);
    $("token").focus();
  }

  async function start() {
    $("login").hidden = true;
    $("logout").hidden = false;
    $("work").hidden = false;
    await refreshProgress();
    await loadNext();
  }

  async function refreshProgress() {
    const { status, data } = await api("GET", "/api/me");
    if (status !== 200) return;
    $("whoami").textContent = data.name;
    $("progress").textContent = `done ${data.done} · remaining ${data.remaining}`;
  }

  async function loadNext() {
    const { status, data } = await api("GET", "/api/tasks/next");
    if (status !== 200) { say(`Could not load a task (${status}). ${detailText(data)}`, true); return; }
    task = data.task;
    $("task").hidden = !task;
    $("empty").hidden = !!task;
    if (task) render(task);
  }

  function render(t) {
    $("prompt").replaceChildren(transcript(t.prompt));
    list.replaceChildren();
    selected = null;
    const template = $("item-template");
    t.responses.forEach((text, i) => {
      const li = template.content.firstElementChild.cloneNode(true);
      li.dataset.index = String(i);
      li.querySelector(".text").replaceChildren(transcript(text));  // never parsed as HTML: model output is untrusted
      li.addEventListener("click", (e) => { if (!e.target.closest("label, select")) select(li); });
      li.addEventListener("dragstart", (e) => {
        dragged = li;
        li.classList.add("dragging");
        e.dataTransfer.effectAllowed = "move";
        e.dataTransfer.setData("text/plain", li.dataset.index);
      });
      li.addEventListener("dragend", () => { li.classList.remove("dragging"); dragged = null; renumber(); });
      list.appendChild(li);
    });
    renumber();
  }

  // --- ordering ------------------------------------------------------------------------------------------
  const items = () => Array.from(list.querySelectorAll("li.item"));

  function renumber() {
    items().forEach((li, pos) => {
      li.querySelector(".pos").textContent = String(pos + 1);
      const tie = li.querySelector(".tie-box");
      tie.disabled = pos === 0;  // the top response has nothing above it to tie with
      li.classList.toggle("tied", pos > 0 && tie.checked);
    });
  }

  function select(li) {
    if (selected) selected.classList.remove("selected");
    selected = li;
    if (li) { li.classList.add("selected"); li.focus({ preventScroll: false }); }
  }

  function move(li, delta) {
    const all = items();
    const to = all.indexOf(li) + delta;
    if (to < 0 || to >= all.length) return;
    if (delta < 0) list.insertBefore(li, all[to]);
    else list.insertBefore(li, all[to].nextSibling);
    renumber();
    li.focus();
  }

  // While dragging, the item follows the pointer: it goes before the first item whose middle is below it.
  list.addEventListener("dragover", (e) => {
    if (!dragged) return;
    e.preventDefault();
    const after = items().find((li) => {
      if (li === dragged) return false;
      const box = li.getBoundingClientRect();
      return e.clientY < box.top + box.height / 2;
    });
    if (after) { if (after !== dragged.nextSibling) list.insertBefore(dragged, after); }
    else if (list.lastElementChild !== dragged) list.appendChild(dragged);
  });
  list.addEventListener("drop", (e) => { e.preventDefault(); renumber(); });
  list.addEventListener("change", renumber);

  function currentRanking() {
    const groups = [];
    items().forEach((li, pos) => {
      const i = Number(li.dataset.index);
      if (pos > 0 && li.querySelector(".tie-box").checked) groups[groups.length - 1].push(i);
      else groups.push([i]);
    });
    return groups.map((g) => (g.length === 1 ? g[0] : g));
  }

  function currentFlags() {
    return items().filter((li) => li.querySelector(".flag").value)
      .map((li) => ({ index: Number(li.dataset.index), flag: li.querySelector(".flag").value }));
  }

  // --- submit and skip --------------------------------------------------------------------------------------
  async function submit() {
    if (!task || busy) return;
    busy = true;
    try {
      const { status, data } = await api("POST", "/api/rankings",
        { task_id: task.id, ranking: currentRanking(), flags: currentFlags() });
      if (status === 201) { say("Saved."); await refreshProgress(); await loadNext(); }
      else if (status === 409 || status === 404) { say(detailText(data) + " Loading the next task."); await loadNext(); }
      else say(`Not saved (${status}): ${detailText(data)}`, true);
    } catch (e) {
      if (e.message !== "unauthorized") say("Network error: the ranking was not saved. Try again.", true);
    } finally { busy = false; }
  }

  async function skip() {
    if (!task || busy) return;
    busy = true;
    try {
      const { status, data } = await api("POST", `/api/tasks/${task.id}/skip`);
      if (status === 200 || status === 404 || status === 409) {
        say(status === 200 ? "Skipped." : detailText(data));
        await refreshProgress();
        await loadNext();
      } else say(`Skip failed (${status}): ${detailText(data)}`, true);
    } catch (e) {
      if (e.message !== "unauthorized") say("Network error: the task was not skipped. Try again.", true);
    } finally { busy = false; }
  }

  // --- keyboard ----------------------------------------------------------------------------------------------
  document.addEventListener("keydown", (e) => {
    if (!task || $("work").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = e.target.tagName;
    if (tag === "INPUT" && e.target.type !== "checkbox") return;  // typing a token
    if (tag === "SELECT" || tag === "TEXTAREA") return;            // the flag menu uses the arrows itself
    const digit = /^Digit([1-9])$/.exec(e.code) || /^Numpad([1-9])$/.exec(e.code);
    if (digit) {
      const li = items()[Number(digit[1]) - 1];
      if (li) { select(li); e.preventDefault(); }
    } else if ((e.key === "ArrowUp" || e.key === "ArrowDown") && selected) {
      move(selected, e.key === "ArrowUp" ? -1 : 1);
      e.preventDefault();
    } else if ((e.key === "t" || e.key === "T") && selected) {
      const box = selected.querySelector(".tie-box");
      if (!box.disabled) { box.checked = !box.checked; renumber(); }
    } else if ((e.key === "f" || e.key === "F") && selected) {
      const menu = selected.querySelector(".flag");
      menu.selectedIndex = (menu.selectedIndex + 1) % menu.options.length;
    } else if (e.key === "Escape") {
      select(null);
    } else if (e.key === "Enter" && tag !== "BUTTON") {
      e.preventDefault();
      submit();
    } else if (e.key === "s" || e.key === "S") {
      skip();
    }
  });

  // --- wiring ------------------------------------------------------------------------------------------------
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    say("");
    try { await start(); } catch (err) { if (err.message !== "unauthorized") say("Cannot reach the server.", true); }
  });
  $("logout").addEventListener("click", () => showLogin());
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);

  if (localStorage.getItem(TOKEN_KEY)) {
    start().catch((err) => { if (err.message !== "unauthorized") say("Cannot reach the server.", true); });
  } else {
    showLogin();
  }
})();
