"""The README and docs/: every repository path they name exists, links and anchors resolve, and the README stays
short and names the two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "assets" / "shapes-model" / "README.md"]

SETUP_AND_START = "pip install torch==2.13.0 && pip install -r requirements.txt -e . && python app.py"
SETUP_AND_TEST = "bash .ci/run"
FAST_TIER = 'python -m pytest -m "not slow"'

# Only strings that start with one of the repository's own top-level names count as repository paths, so that
# e.g. `comfy/latent_formats.py` (another project's file) or a URL is not taken for one of ours.
TOP_DIRS = ("sega", "server", "tests", "assets", "benchmarks", "docs", ".ci")
TOP_FILES = ("app.py", "README.md", "pyproject.toml", "requirements.txt")
_PATH = re.compile(
    r"(?<![\w./:-])"  # not inside a URL, a dotted name or a longer path
    r"((?:" + "|".join(re.escape(d) for d in TOP_DIRS) + r")/[\w.*/-]*"
    r"|(?:" + "|".join(re.escape(f) for f in TOP_FILES) + r"))"
    r"(?![\w/-])"
)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def repo_paths(text: str) -> set[str]:
    """The repository paths (relative to the root) that a Markdown text names, in prose, code or commands."""
    return {m.rstrip(".").rstrip("/") or m for m in _PATH.findall(text)}


def local_links(text: str) -> set[str]:
    """Link targets in a Markdown text that point into the repository (not URLs, not anchors of the same page)."""
    return {t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a "# comment" in code is no heading
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def exists(path: str) -> bool:
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def missing(page: Path) -> list[str]:
    """What a page names that is not there: repository paths, local links and their anchors."""
    text = page.read_text()
    found = [p for p in sorted(repo_paths(text)) if not exists(p)]
    for target in sorted(local_links(text)):
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve()
        if not linked.exists():
            found.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            found.append(target)
    return found


def test_the_extractor_finds_repository_paths_and_nothing_else(tmp_path):
    text = (
        "See `sega/pipeline.py` and [the card](assets/shapes-model/README.md); run "
        "`python -m pytest tests/library/test_nope.py tests/server/test_*.py`. Not ours: "
        "`comfy/latent_formats.py`, https://github.com/x/sega/blob/main/sega/x.py, `server.service.gpu_duration`, "
        "`mysega/a.py`. Ends a sentence: app.py."
    )
    assert repo_paths(text) == {"sega/pipeline.py", "assets/shapes-model/README.md", "tests/library/test_nope.py",
                                "tests/server/test_*.py", "app.py"}
    assert local_links(text + " [x](https://example.com) [y](#here) [z](api.md#limits)") == {
        "assets/shapes-model/README.md", "api.md#limits"}
    # A page that names a missing file, a missing link and a missing anchor fails; real ones pass.
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n`sega/pipeline.py`, `sega/no_such_module.py`, [a](gone.md), [b](page.md#title), "
                    "[c](page.md#no-such-heading), `tests/server/test_*.py`, `tests/nothing_*.py`\n")
    assert missing(page) == ["sega/no_such_module.py", "tests/nothing_*.py", "gone.md", "page.md#no-such-heading"]
    assert slug("Implicit masks (LEDITS++)") == "implicit-masks-ledits" and slug("`/edit`") == "edit"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_and_link_a_page_names_exists(page):
    assert page.exists()
    assert missing(page) == []


def test_the_readme_is_short_and_names_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert SETUP_AND_START in commands and SETUP_AND_TEST in commands and FAST_TIER in commands
    # The test command is the CI script, which installs torch first as the start command does.
    assert "torch==2.13.0" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_holds_no_lab_notes():
    """Machine loads, session words and target checklists belong in docs/benchmarks.md or nowhere."""
    text = README.read_text().lower()
    for words in ("load average", "this session", "was lent", "not met", "**met**", "this round"):
        assert words not in text, words


def test_the_files_section_names_every_module():
    """docs/architecture.md lists every Python file of the library, the server, the benchmarks and the tests."""
    listed = (ROOT / "docs" / "architecture.md").read_text()
    modules = [path.relative_to(ROOT).as_posix() for folder in ("sega", "server", "benchmarks", "tests")
               for path in sorted((ROOT / folder).rglob("*.py")) if path.name != "__init__.py"]
    assert modules
    missing = [module for module in modules if f"`{module}`" not in listed]
    assert not missing, f"docs/architecture.md does not name: {missing}"
