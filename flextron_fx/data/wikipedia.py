"""English Wikipedia articles from the sample dump shipped inside the gensim wheel.

gensim is never imported (it needs scipy and more): the bz2 dump is read as a file, from
the installed package or from the wheel fetched with ``pip download``.
"""

from __future__ import annotations

import bz2
import contextlib
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from flextron_fx.data._fetch import cache_root, package_file

log = logging.getLogger(__name__)

GENSIM_VERSION = "4.4.0"
_MEMBER = ("gensim/test/test_data/"
           "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
# Bump when the extraction changes, so stale JSON caches are rebuilt.
_FORMAT = 1
MIN_CHARS = 500

# Links into these namespaces carry no prose (images, categories, interwiki prefixes).
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:",
                        re.IGNORECASE)
_DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "score", "chem"}
_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\||!)")
_HTML = re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref>|<[^>\n]{1,200}>",
                   re.DOTALL | re.IGNORECASE)
_LEFTOVER = re.compile(r"\{\{.*?\}\}|\[\[.*?\]\]|\{\{|\}\}|\[\[|\]\]", re.DOTALL)


def wikipedia_articles(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(title, plain text) of the articles in the gensim 4.4.0 English Wikipedia sample.

    Redirects, non-article namespaces and articles under 500 characters are dropped. The
    result is cached as JSON under ``<cache root>/data/``.

    Example:
        >>> docs = wikipedia_articles()  # doctest: +SKIP
        >>> docs[0][0], len(docs) >= 80  # doctest: +SKIP
        ('Anarchism', True)
    """
    root = cache_root(cache_dir)
    cached = root / "data" / f"enwiki-gensim-{GENSIM_VERSION}.json"
    if cached.is_file():
        payload = json.loads(cached.read_text(encoding="utf-8"))
        if payload.get("format") == _FORMAT:
            return [(t, x) for t, x in payload["articles"]]

    dump = package_file(_MEMBER, "gensim", GENSIM_VERSION, root, "data")
    log.info("extracting Wikipedia articles from %s", dump)
    articles = list(_parse_dump(dump))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".part")
    tmp.write_text(json.dumps({"format": _FORMAT, "source": _MEMBER,
                               "articles": articles}, ensure_ascii=False), encoding="utf-8")
    tmp.replace(cached)
    log.info("cached %d articles in %s", len(articles), cached)
    return articles


def _parse_dump(path: Path):
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if _local(el.tag) != "page":
                continue
            fields = {}
            for child in el.iter():
                fields.setdefault(_local(child.tag), child)
            title = _text(fields.get("title"))
            raw = _text(fields.get("text"))
            el.clear()
            if _text(fields.get("ns")) != "0" or "redirect" in fields:
                continue
            if raw.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = wikitext_to_plain(raw)
            if len(text) >= MIN_CHARS:
                yield title, text


def wikitext_to_plain(wikitext: str) -> str:
    """Strip MediaWiki markup, keeping the prose, one paragraph per line.

    Example:
        >>> wikitext_to_plain("'''Abc''' is a [[letter|glyph]].{{cite}}<ref>x</ref>")
        'Abc is a glyph.'
    """
    try:
        import mwparserfromhell
    except ImportError as e:
        raise ImportError("reading Wikipedia needs mwparserfromhell: "
                          "pip install 'flextron_fx[demo]'") from e

    code = mwparserfromhell.parse(wikitext)
    doomed = [n for n in code.filter_wikilinks() if _DROP_LINK.match(str(n.title))]
    doomed += [n for n in code.filter_tags() if str(n.tag).strip().lower() in _DROP_TAGS]
    for node in doomed:
        with contextlib.suppress(ValueError):  # already gone with an enclosing node
            code.remove(node)
    text = code.strip_code(normalize=True, collapse=True)
    # strip_code leaves what the parser could not match: broken tables, refs, templates.
    text = _HTML.sub("", text)
    lines = []
    for line in text.splitlines():
        if _TABLE_LINE.match(line):
            continue
        line = _LEFTOVER.sub("", line)
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(el) -> str:
    return (el.text or "") if el is not None else ""
