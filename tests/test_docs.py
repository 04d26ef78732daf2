"""The README and docs/: every relative link points at something in the repo, and the README stays short and
keeps the test command .ci/run reads from it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), ![alt](img)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)  # [label]: target
CI_TEST_COMMAND = re.compile(r"^    \$ (python -m pytest.*)$", re.M)  # .ci/run: sed -n 's/^    \$ \(python -m pytest.*\)$/\1/p'


def prose(text):
    """The page without its code: fenced blocks, indented blocks and `inline spans` hold commands, not links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    text = re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)
    return re.sub(r"(`+).+?\1", "", text, flags=re.S)


def relative_links(page):
    text = prose(page.read_text(encoding="utf-8"))
    for target in LINK.findall(text) + REFERENCE.findall(text):
        if re.match(r"(https?|mailto):", target, re.I) or target.startswith("#"):
            continue
        yield target


def test_relative_links_point_into_the_repo():
    assert (ROOT / "README.md").is_file()
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in (path, *path.parents):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing in the repo:\n" + "\n".join(broken)


def test_links_are_found():
    """The check above would pass vacuously if the pattern matched nothing: the README links its docs and plot."""
    targets = set(relative_links(ROOT / "README.md"))
    assert "assets/forgetting-front.png" in targets
    assert any(t.startswith("docs/") for t in targets)


def test_readme_is_short_and_names_the_test_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it to 250, move the rest to docs/"
    assert CI_TEST_COMMAND.search(text), "README.md lost the '    $ python -m pytest ...' line .ci/run runs"
