"""The search page in a real browser: Playwright driving Debian's Chromium against a served tiny index."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from serve_setup import deployment, running_server  # noqa: F401  (deployment is a fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api",
                                 reason="playwright is in the dev extra: pip install -e .[dev]")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium (make browser-deps)",
                allow_module_level=True)


def _columns(page) -> dict[str, list[dict]]:
    """tenant -> the cards of its column: key, rank, the rank shown for the other column, image state."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.column')].map(col => [
        col.dataset.tenant, [...col.querySelectorAll('.result')].map(card => {
            const img = card.querySelector('img'), mark = card.querySelector('.other-rank');
            return {key: card.dataset.key, rank: Number(card.dataset.rank),
                    other: mark ? mark.dataset.otherRank : null, text: mark ? mark.textContent : null,
                    src: img.getAttribute('src') || '', loaded: img.complete && img.naturalWidth > 0};
        })]))""")


def test_page_shows_thumbnails_and_side_by_side_ranks(deployment, tmp_path):  # noqa: F811
    from mmft.serve import create_app

    feedback = tmp_path / "feedback.jsonl"
    app = create_app(deployment.config(tokens=False, feedback={"path": str(feedback)}))
    with running_server(app) as base, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(base + "/")
            page.wait_for_selector("#tenant option[value=tuned]", state="attached")
            page.select_option("#tenant", "tuned")
            page.fill("#query", "a red square")
            page.press("#query", "Enter")
            page.wait_for_function(
                "document.querySelectorAll('.column[data-tenant=tuned] .result').length == 8")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            cols = _columns(page)
            assert list(cols) == ["baseline", "tuned"] and all(len(c) == 8 for c in cols.values())
            for here, there in (("tuned", "baseline"), ("baseline", "tuned")):
                ranks = {c["key"]: c["rank"] for c in cols[there]}
                for card in cols[here]:
                    assert card["loaded"] and card["src"].startswith("data:image/jpeg;base64,")
                    expected = str(ranks[card["key"]]) if card["key"] in ranks else ""
                    assert card["other"] == expected, (here, card)
                    assert (f"{there}: #{expected}" if expected else f"{there}: not in top 8") == card["text"]
            assert [c["rank"] for c in cols["tuned"]] == list(range(1, 9))
            assert page.text_content("#status").endswith("ms")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            shot = os.environ.get("MMFT_SERVE_SCREENSHOT")  # a copy, e.g. for a look by eye
            if shot:
                page.screenshot(path=shot, full_page=True)

            # a relevance click lands in the feedback file
            page.click(".column[data-tenant=tuned] .result >> nth=0 >> button:text('relevant')")
            page.wait_for_selector(".column[data-tenant=tuned] .result >> nth=0 >> button.sent")
            record = json.loads(feedback.read_text().splitlines()[-1])
            assert (record["tenant"], record["query"], record["relevant"]) == ("tuned", "a red square", True)
            assert record["key"] == cols["tuned"][0]["key"]

            # an image dropped on the page (here: chosen through the file input) finds similar images
            page.evaluate("document.querySelector('#status').textContent = ''")
            page.set_input_files("#file", str(deployment.root / "src" / "im003.png"))
            page.wait_for_function("document.querySelector('#status').textContent.includes('results in')")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            cols = _columns(page)
            assert len(cols["tuned"]) == 8 and all(c["loaded"] for c in cols["tuned"])
            assert cols["tuned"][0]["key"] == cols["baseline"][0]["key"] == "00000003"  # the image itself
        finally:
            browser.close()
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
