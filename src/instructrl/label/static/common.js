// Shared by the ranking, guidelines and review pages: the API call, and model text put on the page safely.
//
// Model text and guidelines are untrusted. They are never parsed as HTML: a small Markdown subset (paragraphs,
// headings, lists, fenced code blocks, `inline code`, **bold**, *emphasis*) is turned into elements built with
// createElement and filled with textContent only. No links or images are made: a [text](url) stays text.
"use strict";

window.instructrl = (() => {
  const TOKEN_KEY = "instructrl.label.token";
  const ROLES = ["system", "user", "assistant"];

  async function request(method, path, body) {
    const headers = { Authorization: "Bearer " + (localStorage.getItem(TOKEN_KEY) || "") };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    return { status: resp.status, data };
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // `code`, **bold**, *emphasis*; everything else is text.
  const INLINE = /(`+)([\s\S]+?)\1|\*\*([^*]+?)\*\*|\*([^*\s](?:[^*]*[^*\s])?)\*/g;

  function inline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      if (m[1]) parent.append(el("code", "", m[2]));
      else if (m[3] !== undefined) parent.append(el("strong", "", m[3]));
      else parent.append(el("em", "", m[4]));
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
    return parent;
  }

  const FENCE = /^\s*(```+|~~~+)/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;

  // Markdown subset -> a <div class="md"> of safe elements.
  function markdown(text) {
    const root = el("div", "md");
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        const body = [];
        for (i += 1; i < lines.length && !lines[i].trim().startsWith(fence[1]); i += 1) body.push(lines[i]);
        i += 1;  // the closing fence (or the end of the text)
        const pre = el("pre", "code");
        pre.append(el("code", "", body.join("\n")));
        root.append(pre);
      } else if (HEADING.test(line)) {
        const [, hashes, title] = HEADING.exec(line);
        root.append(inline(el("h" + Math.min(6, hashes.length + 2)), title));
        i += 1;
      } else if (ITEM.test(line)) {
        const ordered = /\d/.test(ITEM.exec(line)[1]);
        const list = el(ordered ? "ol" : "ul");
        while (i < lines.length && ITEM.test(lines[i]) && /\d/.test(ITEM.exec(lines[i])[1]) === ordered) {
          list.append(inline(el("li"), ITEM.exec(lines[i])[2]));
          i += 1;
        }
        root.append(list);
      } else if (!line.trim()) {
        i += 1;
      } else {
        const para = [];
        while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
               && !ITEM.test(lines[i])) { para.push(lines[i]); i += 1; }
        root.append(inline(el("p"), para.join("\n")));
      }
    }
    return root;
  }

  // A string, or a conversation's messages as turns, each with its role.
  function transcript(value) {
    if (typeof value === "string") return markdown(value);
    const turns = el("div", "turns");
    for (const m of value) {
      const role = ROLES.includes(m.role) ? m.role : "user";
      const turn = el("div", "turn " + role);
      turn.append(el("span", "role", role), markdown(m.content));
      turns.append(turn);
    }
    return turns;
  }

  return { TOKEN_KEY, request, el, markdown, transcript };
})();
