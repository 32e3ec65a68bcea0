"""Render a page in headless Chromium (Debian's ``chromium``) and read what it drew.

A copy of the page gets a small script that, once every picture has loaded or failed, writes
how many images there are and which ones did not decode into the DOM, so ``--dump-dom``
shows what the browser made of the page and not only what the file says.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")
CHECK_ID = "browser-image-check"
IMAGE_CHECK = f"""<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const out = document.createElement("pre");
  out.id = "{CHECK_ID}";
  out.textContent = JSON.stringify({{images: images.length, broken: broken}});
  document.body.appendChild(out);
}});
</script>"""


def _chromium(chromium: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [str(chromium), *FLAGS, f"--user-data-dir={profile}", *arguments]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def rendered_dom(chromium: Path, page: Path, work: Path) -> tuple[str, dict]:
    """The DOM Chromium built from ``page`` after loading it, and the image check
    (``{"images": n, "broken": [alt, ...]}``)."""
    checked = work / f"checked_{page.name}"
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = _chromium(chromium, work / "profile", "--virtual-time-budget=10000", "--dump-dom",
                    checked.as_uri()).stdout
    start = dom.index(f'<pre id="{CHECK_ID}">') + len(f'<pre id="{CHECK_ID}">')
    return dom, json.loads(dom[start:dom.index("</pre>", start)])


def screenshot(chromium: Path, page: Path, png: Path, width: int = 1300,
               height: int = 8000) -> Path:
    """A PNG of the top ``height`` px of ``page`` at ``width`` px."""
    _chromium(chromium, png.parent / "profile", f"--window-size={width},{height}",
              f"--screenshot={png}", page.as_uri())
    return png


@dataclass
class Page:
    """What a page holds: its tables (by id, or by class and ``data-algorithm``), each a list
    of rows of cell texts keyed by the row's ``data-hospital``; its images' attributes; every
    tag name and every ``src``/``href`` value."""

    tables: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)
    images: list[dict[str, str]] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)
    links: list[str] = field(default_factory=list)


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._table: str | None = None
        self._row: tuple[str, list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.page.tags.add(tag)
        self.page.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "img":
            self.page.images.append(a)
        elif tag == "table":
            self._table = a.get("id") or f"{a.get('class')}:{a.get('data-algorithm')}"
            self.page.tables[self._table] = []
        elif tag == "tr" and self._table and "data-hospital" in a:
            self._row = (a["data-hospital"], [])
            self.page.tables[self._table].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row[1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def read_page(html: str) -> Page:
    """The tables, images, tags and links of ``html``."""
    reader = _Reader()
    reader.feed(html)
    return reader.page
