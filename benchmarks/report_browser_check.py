"""Open a MedSMILE run report in headless Chromium: the page must load and show every one of its images.

The report folder is copied to a temporary folder and a short script is added to the head of the copy's page (the
run folder is left as it is; the report itself has no script). It notes every image ``error`` event, and on the
window's ``load`` event, which fires once every image has loaded or failed, it writes the page state and each
``<img>``'s ``naturalWidth`` / ``naturalHeight`` into the DOM, which ``chromium --headless --dump-dom`` prints. PASS needs: the page's title, as many loaded images as
``<img>`` tags in the HTML source (at least one), each image with the pixel size of its PNG file, and every image
URL a file inside the report folder (nothing fetched from elsewhere).

Usage (from the repository root)::

    python benchmarks/report_browser_check.py RUN_DIR                 # checks RUN_DIR/report/index.html
    python benchmarks/report_browser_check.py RUN_DIR --build [--ground-truth-dir MASKS] [--screenshot shot.png]

``--build`` (re)writes the report first with ``scripts.report.write_report``. Chromium is Debian's ``chromium``
package (``apt-get install -y chromium``). Exit code 0 on PASS, 1 on FAIL, 2 when no Chromium is found.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TITLE = "MedSMILE run report"
MARKER_ID = "browser-check"
PROBE = f"""<script>
var failedImages = [];
document.addEventListener("error", function (event) {{
  if (event.target.tagName === "IMG") failedImages.push(event.target);
}}, true);
window.addEventListener("load", function () {{
  var out = document.createElement("pre");
  out.id = "{MARKER_ID}";
  out.textContent = JSON.stringify({{readyState: document.readyState, title: document.title,
    images: Array.prototype.map.call(document.images, function (img) {{
      return {{src: img.getAttribute("src"), url: img.currentSrc, complete: img.complete,
              error: failedImages.indexOf(img) >= 0, width: img.naturalWidth, height: img.naturalHeight}};
    }})}});
  document.body.appendChild(out);
}});
</script>"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _ImageTags(HTMLParser):
    """The ``src`` of every ``<img>`` in a page, as written in its source."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def image_sources(page: str) -> list[str]:
    parser = _ImageTags()
    parser.feed(page)
    return parser.sources


def png_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a PNG header, or None when the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _chromium_args(chromium: str, profile: str) -> list[str]:
    return [
        chromium,
        "--headless",
        "--no-sandbox",  # needed as root, e.g. in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",  # let the page finish loading before the DOM is dumped
    ]


def check_report(index_html: str, chromium: str | None = None, screenshot: str | None = None, timeout_s=120) -> dict:
    """Load ``index_html`` in headless Chromium; returns ``{"pass", "problems", "images", ...}`` (see module doc)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    report_dir = os.path.dirname(os.path.abspath(index_html))
    with open(index_html, encoding="utf-8") as f:
        page = f.read()
    expected = image_sources(page)
    with tempfile.TemporaryDirectory(prefix="report_check_") as tmp:
        copy = os.path.join(tmp, "report")
        shutil.copytree(report_dir, copy)
        probe_page = os.path.join(copy, "browser_check.html")
        with open(probe_page, "w", encoding="utf-8") as f:
            f.write(page.replace("<head>", "<head>" + PROBE, 1))
        args = _chromium_args(chromium, os.path.join(tmp, "profile"))
        url = "file://" + probe_page
        t0 = time.time()
        done = subprocess.run(
            [*args, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        seconds = time.time() - t0
        if screenshot:
            shot = os.path.abspath(screenshot)
            subprocess.run(
                [*args, "--window-size=1300,2400", f"--screenshot={shot}", url],
                capture_output=True,
                timeout=timeout_s,
                check=True,
            )
        result = _judge(done, copy, expected, seconds)
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return {**result, "chromium": version, "page": os.path.abspath(index_html)}


def _judge(done: subprocess.CompletedProcess, copy: str, expected: list[str], seconds: float) -> dict:
    result = {"pass": False, "problems": [], "images": [], "expected_images": len(expected), "seconds": seconds}
    problems = result["problems"]
    match = re.search(rf'<pre id="{MARKER_ID}">(.*?)</pre>', done.stdout, re.DOTALL)
    if done.returncode != 0 or match is None:
        problems.append(f"chromium exit {done.returncode}, no probe output; stderr tail: {done.stderr[-2000:]}")
        return result
    state = json.loads(html.unescape(match.group(1)))
    if state["readyState"] != "complete" or state["title"] != TITLE:
        problems.append(f"page state {state['readyState']!r}, title {state['title']!r}")
    images = result["images"] = state["images"]
    if not images:
        problems.append("the page shows no image")
    if [i["src"] for i in images] != expected:
        problems.append(f"{len(images)} images in the DOM, {len(expected)} <img> tags in the HTML source")
    root = os.path.realpath(copy)
    for image in images:
        path = os.path.realpath(unquote(urlparse(image["url"]).path))
        if not image["url"].startswith("file://") or os.path.commonpath([path, root]) != root:
            problems.append(f"{image['src']}: loaded from outside the report folder ({image['url']})")
        elif not image["complete"] or image["error"] or image["width"] <= 0 or image["height"] <= 0:
            problems.append(f"{image['src']}: not shown (error event {image['error']}, naturalWidth {image['width']})")
        elif png_size(path) != (image["width"], image["height"]):
            problems.append(f"{image['src']}: shown at {image['width']}x{image['height']}, file is {png_size(path)}")
    result["pass"] = not problems
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a MedSMILE output_dir (or the report's index.html)")
    parser.add_argument("--build", action="store_true", help="write the report first (scripts.report.write_report)")
    parser.add_argument("--ground-truth-dir", help="with --build: score each round's pseudo-labels against these masks")
    parser.add_argument("--screenshot", help="also save a PNG screenshot of the page here")
    parser.add_argument(
        "--chromium", help=f"Chromium binary (default: the first of {', '.join(CHROMIUM_NAMES)} on PATH)"
    )
    args = parser.parse_args()
    index_html = args.run_dir if args.run_dir.endswith(".html") else os.path.join(args.run_dir, "report", "index.html")
    if args.build:
        sys.path.insert(0, os.path.join(REPO, "bundle"))
        from scripts.report import write_report

        index_html = write_report(args.run_dir, args.ground_truth_dir)
    chromium = args.chromium or find_chromium()
    if chromium is None:
        print(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); apt-get install -y chromium")
        return 2
    result = check_report(index_html, chromium, args.screenshot)
    print(f"{result['chromium']}: {result['page']} loaded in {result['seconds']:.2f} s")
    for image in result["images"]:
        print(f"  {image['src']}: {image['width']}x{image['height']} error={image['error']}")
    print(f"{len(result['images'])} images shown of {result['expected_images']} <img> tags")
    for problem in result["problems"]:
        print("PROBLEM:", problem)
    print("PASS" if result["pass"] else "FAIL")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
