"""Screenshot a deepfit report.html at 1280 px in headless Chromium, and check the page is no wider than that.

    python benchmarks/report_screenshot.py [REPORT_DIR/report.html] [--out shot.png] [--width 1280]

Without a report it renders the synthetic report of tests/test_deepfit_report_html.py (figures, six tables).
Needs a Chromium binary (``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH; on Debian
``apt-get install chromium`` takes about a minute). The check: the page's ``scrollWidth`` (read by a script
run in a copy of the page) must be <= the window width, i.e. wide tables scroll inside their own box and the
page itself never scrolls sideways. Exit 0 when it fits, 1 when it does not, 2 without a browser.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _synthetic(dirpath: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_deepfit_report_html import _result

    from deepfit import report as R

    res = _result()
    return R.write_html(res, R.make_plots(res, dirpath), dirpath / "report.html")


def page_width(browser: str, html: Path, width: int, tmp: Path) -> int:
    """document.documentElement.scrollWidth of ``html`` in a ``width``-px window (from a copy of the page in ``tmp``;
    the report embeds its images, so the copy renders alike)."""
    probe = tmp / "width-probe.html"
    probe.write_text(html.read_text(encoding="utf-8").replace(
        "</body>", "<script>document.title = 'scrollWidth=' + document.documentElement.scrollWidth;</script></body>"),
        encoding="utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"scrollWidth=(\d+)", dom)
    if not m:
        raise RuntimeError("the browser did not report the page width")
    return int(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("html", nargs="?", default=None, help="a report.html (default: the synthetic test report)")
    ap.add_argument("--out", default="report_1280.png", help="screenshot file (default report_1280.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = ap.parse_args(argv)
    if Path(a.out).exists() and not a.overwrite:
        print(f"{a.out} exists; pass --overwrite or another --out", file=sys.stderr)
        return 2
    browser = _browser()
    if browser is None:
        print(f"no headless browser found ({', '.join(BROWSERS)}); install one, e.g. apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(a.html).resolve() if a.html else _synthetic(Path(tmp))
        out = Path(a.out).resolve()
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={a.width},3000", f"--screenshot={out}", html.as_uri()],
                       capture_output=True, timeout=120, check=True)
        w = page_width(browser, html, a.width, Path(tmp))
    print(f"{out}: page scrollWidth {w} px in a {a.width} px window -> {'fits' if w <= a.width else 'TOO WIDE'}")
    return 0 if w <= a.width else 1


if __name__ == "__main__":
    raise SystemExit(main())
