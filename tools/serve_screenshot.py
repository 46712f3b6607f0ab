#!/usr/bin/env python
r"""Screenshot of the `mmft serve` page for a query: serve a config on loopback, type the query in Chromium.

    python tools/serve_screenshot.py --config configs/serve.yaml --query "a red apple" \
        --out docs/serve-page.png

Runs the app in this process (uvicorn on 127.0.0.1, a free port), drives Debian's Chromium with
Playwright like tests/test_serve_page.py, waits (bounded) for both columns and their thumbnails, and
saves a full-page PNG.
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/serve.yaml")
    p.add_argument("--query", default="a red apple")
    p.add_argument("--tenant", default="tuned")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", default="docs/serve-page.png")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args(argv)
    import uvicorn
    from playwright.sync_api import sync_playwright

    from mmft.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(f"#tenant option[value='{args.tenant}']", state="attached")
            page.select_option("#tenant", args.tenant)
            page.fill("#k", str(args.k))
            page.fill("#query", args.query)
            page.press("#query", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.column .result').length >= {args.k}")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
