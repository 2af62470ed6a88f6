"""A PNG of a search's HTML report, as headless Chromium renders it (to look at, and for docs/).

    python benchmarks/report_screenshot.py hpsearch_runs/digits-mlp [docs/report.png] [--width 1280] [--json]

Writes the report first if the search has none. Needs Debian's ``chromium`` and ``chromium-driver``
(``apt-get install -y chromium chromium-driver``) and ``pip install selenium``; no browser download.
Prints what the browser saw: the page's JavaScript console errors, how many plot containers there
are and how many of them drew an SVG, and the trial table's rows (``--json``: as JSON, which
tests/test_report.py reads); exits 1 on a console error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def browser(width: int = 1280, height: int = 900):  # -> selenium WebDriver
    """Headless Chromium from the system's packages, driven by Selenium (console logs kept)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        raise SystemExit("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("search", help="the search's folder (<storage>/<name>)")
    ap.add_argument("png", nargs="?", type=Path, default=None, help="default: report.png in the search folder")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--json", action="store_true", help="print what the browser saw as JSON")
    args = ap.parse_args()

    from hpsearch.report import REPORT_FILE, write_report

    page = Path(args.search) / REPORT_FILE
    if not page.is_file():
        page = write_report(args.search)
    png = args.png or Path(args.search) / "report.png"
    seen = look(page, png, width=args.width)
    if args.json:
        print(json.dumps(seen))
    else:
        print(f"{png} ({args.width} x {seen['height']}): {seen['plots_drawn']} of {seen['plots']} plots drawn, "
              f"{seen['rows']} trial rows")
        for error in seen["errors"]:
            print(f"console error: {error}", file=sys.stderr)
    sys.exit(1 if seen["errors"] else 0)


def look(page: Path, png: Path, *, width: int = 1280) -> dict:
    """Open the page in headless Chromium, take a whole-page screenshot, and say what it saw."""
    from selenium.webdriver.common.by import By

    driver = browser(width)
    try:
        driver.get(page.resolve().as_uri())
        time.sleep(2)  # plotly draws after load
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, height)
        time.sleep(1)
        png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))
        plots = driver.find_elements(By.CSS_SELECTOR, ".plotly-graph-div")
        drawn = [p for p in plots if p.find_elements(By.CSS_SELECTOR, "svg.main-svg")]
        rows = driver.find_elements(By.CSS_SELECTOR, "table#trials tbody tr")
        errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        text = driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
    return {"png": str(png), "height": height, "plots": len(plots), "plots_drawn": len(drawn), "rows": len(rows),
            "errors": errors, "text": text}


if __name__ == "__main__":
    main()
