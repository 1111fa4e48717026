"""The ranking page in a real browser: log in, rank by mouse and by keyboard, skip, and XSS-proof rendering."""
from __future__ import annotations

import os

import pytest

from instructrl.data import read_rankings
from instructrl.label.export import export_rankings
from instructrl.label.store import add_labeler, enqueue_tasks

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync", "--disable-quic"]
XSS = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "plain & simple"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")]


@pytest.fixture
def live(tmp_path, serve_live):
    """The app under uvicorn over three tasks: (db, token, base URL)."""
    from instructrl.label.app import create_app

    db = str(tmp_path / "label.db")
    enqueue_tasks(db, ["Drag me", "Use the keys", "Hostile output"],
                  [["alpha", "beta", "gamma"], ["one", "two", "three"], XSS])
    token = add_labeler(db, "alice")
    yield db, token, serve_live(create_app(db, max_labelers_per_task=3))


def open_page(p, url: str, dialogs: list, **page_options):
    """Chromium at `url`; any alert/confirm/prompt is dismissed and its message appended to `dialogs`."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page(**page_options)
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    return browser, page


def order(page) -> list[str]:
    return page.locator("#responses li.item .text").all_text_contents()


def test_rank_by_mouse_and_keyboard_then_export(live, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    db, token, url = live
    with sync_playwright() as p:
        dialogs = []
        browser, page = open_page(p, url, dialogs)
        page.fill("#token", "wrong-token")
        page.click("#login-form button")
        expect(page.locator("#status")).to_contain_text("not accepted")
        page.fill("#token", token)
        page.click("#login-form button")
        expect(page.locator("#prompt")).to_have_text("Drag me")
        expect(page.locator("#progress")).to_have_text("done 0 · remaining 3")
        assert page.evaluate("localStorage.getItem('instructrl.label.token')") == token

        # task 1, by mouse: drag "gamma" onto the top half of "alpha", then tie "beta" with it
        items = page.locator("#responses li.item")
        items.nth(2).drag_to(items.nth(0), target_position={"x": 20, "y": 3})
        assert order(page) == ["gamma", "alpha", "beta"]
        items.nth(2).locator(".tie-box").check()
        items.nth(0).locator(".flag").select_option("nonsense")
        page.click("#submit")
        expect(page.locator("#prompt")).to_have_text("Use the keys")
        expect(page.locator("#progress")).to_have_text("done 1 · remaining 2")

        # task 2, by keyboard: 3 selects "three", ↑↑ moves it to the top, 3 then ↑ swaps "one" above "two"
        page.locator("body").click(position={"x": 5, "y": 5})
        for key in ["3", "ArrowUp", "ArrowUp", "3", "ArrowUp"]:
            page.keyboard.press(key)
        assert order(page) == ["three", "two", "one"]
        page.keyboard.press("Escape")
        page.keyboard.press("Enter")
        expect(page.locator("#prompt")).to_have_text("Hostile output")

        # task 3: model text is shown as text, never run as HTML
        texts = page.locator("#responses li.item .text")
        assert texts.all_text_contents() == XSS
        assert page.locator("#responses img, #responses script").count() == 0
        assert page.locator("img").count() == 0
        page.keyboard.press("s")
        expect(page.locator("#empty")).to_be_visible()
        expect(page.locator("#progress")).to_have_text("done 2 · remaining 0")
        assert dialogs == []
        browser.close()

    out = tmp_path / "rankings.jsonl"
    export_rankings(db, out)
    got = [(r.prompt, r.to_json()["ranking"], r.extra["labeler"], r.extra["flags"]) for r in read_rankings(out)]
    assert got == [("Drag me", [2, [0, 1]], "alice", [{"index": 2, "flag": "nonsense"}]),
                   ("Use the keys", [2, 1, 0], "alice", [])]


# --- conversations and Markdown -------------------------------------------------------------------------------
def turn(role, content):
    return {"role": role, "content": content}


MD_XSS = ['**<img src=x onerror="window.__xss=1">** and [click](javascript:window.__xss=2)',
          "```html\n<script>window.__xss=3</script>\n```\n- item `<b onmouseover=\"window.__xss=4\">`",
          '<a href="javascript:window.__xss=5">link</a> <iframe src="javascript:window.__xss=6"></iframe>',
          "*<svg onload=window.__xss=7>*"]
TURNS_XSS = [turn("system", '<img src=x onerror="window.__xss=8">'),
             turn("user", "[x](javascript:window.__xss=9) **<script>window.__xss=10</script>**"),
             turn("assistant", "```\n<img src=x onerror=window.__xss=11>\n```"), turn("user", "Go on.")]
HOSTILE = "#task img, #task script, #task iframe, #task svg, #task a, #task b, #task [onerror], #task [onload]"


def test_markdown_and_conversation_turns_never_run_as_html(tmp_path, serve_live):
    """Hostile text inside Markdown and inside a conversation's turns is shown as text: no element from it."""
    from playwright.sync_api import expect, sync_playwright

    from instructrl.label.app import create_app

    db = str(tmp_path / "label.db")
    enqueue_tasks(db, [TURNS_XSS], [MD_XSS])
    token = add_labeler(db, "alice")
    url = serve_live(create_app(db))
    with sync_playwright() as p:
        dialogs = []
        browser, page = open_page(p, url, dialogs)
        page.fill("#token", token)
        page.click("#login-form button")
        expect(page.locator("#prompt .turn")).to_have_count(4)
        assert page.locator("#prompt .turn .role").all_text_contents() == ["system", "user", "assistant", "user"]
        assert page.locator(HOSTILE).count() == 0
        # the Markdown that is allowed is rendered; everything else is the text itself
        assert page.locator("#prompt .turn").nth(0).inner_text().endswith('<img src=x onerror="window.__xss=8">')
        assert page.locator("#prompt .turn strong").all_text_contents() == ["<script>window.__xss=10</script>"]
        assert "[x](javascript:window.__xss=9)" in page.locator("#prompt .turn").nth(1).inner_text()
        texts = page.locator("#responses li.item .text")
        assert texts.nth(0).locator("strong").text_content() == '<img src=x onerror="window.__xss=1">'
        assert texts.nth(1).locator("pre.code code").text_content() == "<script>window.__xss=3</script>"
        assert texts.nth(1).locator("li code").text_content() == '<b onmouseover="window.__xss=4">'
        assert texts.nth(2).text_content() == MD_XSS[2]
        assert texts.nth(3).locator("em").text_content() == "<svg onload=window.__xss=7>"
        texts.nth(1).hover()
        assert page.evaluate("window.__xss") is None and dialogs == []
        browser.close()


def test_import_rank_a_conversation_and_export_the_consensus(tmp_path, serve_live):
    """Import 3 models' answers to 3-turn conversations, rank one in the browser (two others ranked through the
    API), read the guidelines and the review page, export the consensus."""
    import json

    import httpx
    import pyarrow as pa
    import pyarrow.parquet as pq
    from playwright.sync_api import expect, sync_playwright
    from typer.testing import CliRunner

    from instructrl.label.app import create_app
    from instructrl.label.cli import label_app

    runner = CliRunner()
    models = {"good": "acme-70b", "ok": "acme-8b", "bad": "acme-1b"}
    answers = {"good": "Use `sorted()`:\n\n```python\nprint(sorted(xs, reverse=True))\n```\n\n"
                       "It **returns a new list**.",
               "ok": "You can:\n\n- call `xs.sort()`\n- then `xs.reverse()`", "bad": "Sort it <b>yourself</b>."}
    conv = [turn("user", "How do I sort a list in Python?"), turn("assistant", "Call `sorted(xs)` or `xs.sort()`."),
            turn("user", "And **largest first**?")]
    rows = [{"prompt": conv if i == 0 else [turn("user", f"Question {i}?")],
             "response": answers[q] if i == 0 else f"{q} answer {i}", "model": models[q]}
            for i in range(3) for q in ("bad", "ok", "good")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    db = tmp_path / "label.db"
    assert runner.invoke(label_app, ["import", str(tmp_path / "in.parquet"), "--db", str(db)]).exit_code == 0
    tokens = {n: add_labeler(str(db), n, reviewer=n == "alice") for n in ("alice", "bob", "carol")}
    (tmp_path / "guide.md").write_text("# Our guidelines\n\n1. Prefer **correct** answers.\n2. Then short ones.\n")
    url = serve_live(create_app(str(db), guidelines=(tmp_path / "guide.md").read_text()))

    def quality(text: str) -> str:
        """good, ok or bad: of a response's text, or of its rendering on the page"""
        marks = {"good": "returns a new list", "ok": "xs.reverse()", "bad": "yourself"}
        return next((q for q, m in marks.items() if m in text), text.split()[0])

    best_first = {"bob": ["good", "ok", "bad"], "carol": ["bad", "ok", "good"]}  # carol disagrees
    for name, wanted in best_first.items():
        headers = {"Authorization": f"Bearer {tokens[name]}"}
        while (task := httpx.get(f"{url}/api/tasks/next", headers=headers).json()["task"]) is not None:
            shown = [quality(r) for r in task["responses"]]
            r = httpx.post(f"{url}/api/rankings", headers=headers,
                           json={"task_id": task["id"], "ranking": [shown.index(q) for q in wanted]})
            assert r.status_code == 201, r.text

    screens = os.environ.get("LABEL_SCREENSHOTS")
    with sync_playwright() as p:
        browser, page = open_page(p, url, [], viewport={"width": 1280, "height": 1000})
        page.fill("#token", tokens["alice"])
        page.click("#login-form button")
        expect(page.locator("#prompt .turn")).to_have_count(3)
        assert page.locator("#prompt .turn .role").all_text_contents() == ["user", "assistant", "user"]
        assert page.locator("#prompt strong").text_content() == "largest first"
        assert page.locator("#responses pre.code code").text_content() == "print(sorted(xs, reverse=True))"
        assert page.locator("#responses li li").count() == 2
        assert not any(m in page.content() for m in models.values())  # model names never reach the page
        if screens:
            page.screenshot(path=f"{screens}/label-ranking-conversation.png", full_page=True)
        # rank good > ok > bad with the keyboard, whatever order alice was shown
        page.locator("body").click(position={"x": 5, "y": 5})
        for pos, q in enumerate(["good", "ok", "bad"]):
            now = [quality(t) for t in order(page)].index(q)
            page.keyboard.press(str(now + 1))
            for _ in range(now - pos):
                page.keyboard.press("ArrowUp")
        assert [quality(t) for t in order(page)] == ["good", "ok", "bad"]
        page.keyboard.press("Escape")
        page.keyboard.press("Enter")
        expect(page.locator("#prompt .turn p")).to_have_text(["Question 1?"])

        with page.expect_popup() as popup:
            page.click("#guidelines-link")
        guide = popup.value
        expect(guide.locator("#content h3")).to_have_text("Our guidelines")
        assert guide.locator("#content ol li strong").text_content() == "correct"

        page.goto(f"{url}/review")
        expect(page.locator("#content table.review").nth(1).locator("tr")).to_have_count(4)
        rows_text = page.locator("#content table.review").nth(1).locator("tr").all_inner_texts()
        # tasks 2 and 3 first (bob and carol disagree everywhere: 0), then the conversation: alice = bob, carol
        # reversed: (1 + 0 + 0) / 3
        assert [r.split("\t")[:2] for r in rows_text[1:]] == [["2", "0.00"], ["3", "0.00"], ["1", "0.33"]]
        if screens:
            page.screenshot(path=f"{screens}/label-review.png", full_page=True)
        page.evaluate(f"localStorage.setItem('instructrl.label.token', {json.dumps(tokens['bob'])})")
        page.reload()
        expect(page.locator("#status")).to_contain_text("only reviewers")
        browser.close()

    r = runner.invoke(label_app, ["export", "--db", str(db), "--consensus", "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code == 0, r.output
    first = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == conv and first["labelers"] == ["bob", "carol", "alice"]
    best = [first["models"][i] for g in first["ranking"] for i in (g if isinstance(g, list) else [g])]
    assert best == ["acme-70b", "acme-8b", "acme-1b"] and first["agreement"] == pytest.approx(1 / 3)
