"""The documents a newcomer reads: every relative link and every path of the repository they name exists, no
document cites a path outside the repository, the README stays short, and no figure says where it was measured
in words that mean nothing to a reader ("this session's VM") instead of the hardware."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "configs" / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")
# Top-level entries of the checkout a document may name: a path starting with one of them must exist
TRACKED = ("cai_bench/", "docs/", "deploy/", "tests/", "configs/", "results/reference", ".ci/")
# The package's folders at every depth (``render/figures/``, ``aws_lambda/``): a path a document names from inside
# the package starts with one of them and is looked for under each
PACKAGES = sorted(p.parent for p in (ROOT / "cai_bench").rglob("__init__.py"))
PACKAGE_DIRS = tuple(sorted({f"{p.name}/" for p in PACKAGES if p.name != "cai_bench"}))


def _documents() -> list[Path]:
    return [d for d in DOCUMENTS if d.is_file()]


def _links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def _named_paths(text: str) -> list[str]:
    """Backticked names of files or folders of this repository: those under a tracked top-level entry, and the
    package's own modules named from inside it (``data/partitions.py``)."""
    out = []
    for token in CODE.findall(text):
        token = token.rstrip(".,;:)")
        if any(c in token for c in "<>*$~{}[]=|") or "://" in token:
            continue
        if token.startswith(TRACKED) or (token.startswith(PACKAGE_DIRS) and token.endswith((".py", "/"))):
            out.append(token.split("#")[0])
    return out


def _exists(document: Path, target: str) -> bool:
    target = target.split("#")[0]
    bases = (document.parent, ROOT, *PACKAGES)
    return any((base / target).exists() for base in bases)


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_named_path_is_in_the_repository(document):
    text = document.read_text()
    missing = [t for t in _links(text) + _named_paths(text) if not _exists(document, t)]
    assert not missing, f"{document.relative_to(ROOT)} names what the repository does not hold: {missing}"


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_cites_outside_the_repository_or_an_unnamed_machine(document):
    text = document.read_text()
    assert not re.search(r"(\.\./)+shared/|\bshared/(spec|reference|design)", text), "cites shared/"
    assert not re.search(r"this session|session's|the dev(elopment)? VM|on this VM|this machine's VM", text)


def test_the_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    head = "\n".join(lines[:8])
    assert "make demo" in head and "make test" in head


def test_the_checker_finds_a_missing_path_and_a_broken_link(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("See [there](nowhere.md), `cai_bench/gone.py`, `data/none.py`; `results/runs.jsonl` is made.")
    text = document.read_text()
    missing = [t for t in _links(text) + _named_paths(text) if not _exists(document, t)]
    assert missing == ["nowhere.md", "cai_bench/gone.py", "data/none.py"]
