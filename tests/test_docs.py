"""The README and docs/: a short README, links that lead somewhere (on the repository host and in
the site alike), every page in the site's nav, and the site built by mkdocs in strict mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MAX_README_LINES = 200

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose(path: Path) -> str:
    """The file's Markdown without fenced code blocks (shell comments are not headings)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def links(path: Path) -> list[str]:
    """Targets of the file's Markdown links and images, outside code."""
    return LINK.findall(CODE_SPAN.sub("", prose(path)))


def anchors(path: Path) -> tuple[set[str], set[str]]:
    """The heading anchors of a page as the repository host (GitHub) makes them, and as the
    site (Python-Markdown's toc) makes them: both drop punctuation; GitHub turns every space
    into a hyphen, the toc collapses runs of spaces and hyphens into one."""
    host, site = set(), set()
    for heading in HEADING.findall(prose(path)):
        words = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        host.add(words.replace(" ", "-"))
        site.add(re.sub(r"[-\s]+", "-", words))
    return host, site


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_gives_the_quick_start_and_every_command():
    readme = README.read_text(encoding="utf-8")
    for command in ("make demo", "make test", "make demo-text", "make docs"):
        assert f"`{command}" in readme or f"{command} " in readme, command
    for script in ("train", "embed", "evaluation", "test", "cbir", "serve", "analysis"):
        assert f"`python {script}.py -c <config>" in readme, script
    assert "tensorflow[and-cuda]" in readme and "tensorflow-cpu" in readme


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_lead_to_files_and_headings(path):
    broken = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md":
            host, site = anchors(linked)
            if anchor not in host or anchor not in site:
                broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not broken, f"{path.name}: " + "; ".join(broken)


def test_links_are_found():
    """The checks above see the README's links (a regular expression that matched nothing would
    pass them all)."""
    found = links(README)
    assert "docs/getting-started.md#the-demo" in found
    assert "docs/search-page.png" in found


def test_every_page_is_in_the_site_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = [next(iter(entry.values())) for entry in config["nav"]]
    assert sorted(listed) == sorted(p.name for p in PAGES)
    assert config["theme"]["name"] == "mkdocs" and config["strict"] is True


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"]
        + ["--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert {f"{p.stem}.html" for p in PAGES} <= {p.name for p in site.iterdir()}
    assert (site / "search-page.png").is_file()


def test_config_reference_is_rewritten_between_its_markers():
    from config.reference import END, START, with_reference
    from config.schema import reference_markdown

    stale = f"# Config\n\nintro\n\n{START}\n| key | old |\n{END}\n\nafter\n"
    fresh = with_reference(stale)
    assert fresh == f"# Config\n\nintro\n\n{START}\n{reference_markdown()}\n{END}\n\nafter\n"
    assert with_reference(fresh) == fresh
    with pytest.raises(ValueError, match="markers"):
        with_reference("# no markers")
