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


def order(page) -> list[str]:
    return page.locator("#responses li.item .text").all_text_contents()


def test_rank_by_mouse_and_keyboard_then_export(live, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    db, token, url = live
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url)
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
