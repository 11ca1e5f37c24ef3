"""The fetched corpus: per-domain document splits on disk, and the record of what was fetched.

Layout under ``<cache root>/corpus/``::

    record.json                    every domain's sources, licences and sizes (and failures)
    <domain>/test.jsonl            one {"id", "text"} document per line, per split
    <domain>/record.json           written last: the domain's done marker

:func:`fetch` fills it (``flextron data fetch``); :func:`load_split` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from flextron_fx.data._fetch import cache_root, write_atomic
from flextron_fx.data.domains import DOMAINS, SPLITS, resolve_domains

log = logging.getLogger(__name__)

# Bump when extraction or splitting changes, so stale domains are fetched again.
FORMAT = 1


class DataNotFetchedError(FileNotFoundError):
    """A domain's split is not in the cache; the message names the command that fetches it."""


def doc_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from ``seed`` and ``key`` (SHA-256; stable across runs)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_corpus(docs: Sequence[tuple[str, str]], fractions: dict[str, float],
                 seed: int = 0, max_chars: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """Split ``(id, text)`` documents into named parts holding the given shares of the text.

    Documents are ordered by a hash of their id (and ``seed``) and dealt out whole, each to
    the part furthest below its share of the characters dealt so far (ties: the earlier
    part in ``fractions``). So the split is deterministic, independent of input order, no
    document is in two parts, and every part with a share gets documents as soon as there
    are enough. With ``max_chars`` only the documents (in hash order) that start before
    that many characters are used.

    Example:
        >>> docs = [(f"d{i}", "x" * 10) for i in range(10)]
        >>> parts = split_corpus(docs, {"test": 0.3, "train": 0.7})
        >>> {k: len(v) for k, v in parts.items()}
        {'test': 3, 'train': 7}
    """
    ids = [d[0] for d in docs]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"document ids must be unique; {dup!r} occurs twice")
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    order = sorted(docs, key=lambda d: (doc_hash(seed, d[0]), d[0]))
    if max_chars is not None:
        kept, used = [], 0
        for d in order:
            if used >= max_chars:
                break
            kept.append(d)
            used += len(d[1])
        order = kept
    parts: dict[str, list[tuple[str, str]]] = {n: [] for n in fractions}
    chars = dict.fromkeys(fractions, 0)
    dealt = 0
    for doc in order:
        dealt += len(doc[1])
        name = max(fractions, key=lambda n: fractions[n] * dealt - chars[n])
        parts[name].append(doc)
        chars[name] += len(doc[1])
    return parts


def corpus_dir(cache_dir=None) -> Path:
    return cache_root(cache_dir) / "corpus"


def load_split(domain: str, split: str = "test", cache_dir=None) -> list[tuple[str, str]]:
    """The ``(id, text)`` documents of one split of a fetched domain.

    Example:
        >>> docs = load_split("wikipedia", "test")  # doctest: +SKIP
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    folder = corpus_dir(cache_dir) / domain
    if not _is_done(folder):
        raise DataNotFetchedError(f"domain {domain!r} is not fetched into {folder.parent}; "
                                  f"run `flextron data fetch --domains {domain}`")
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        return [(d["id"], d["text"]) for d in map(json.loads, f)]


def read_record(cache_dir=None) -> dict:
    """The fetch record: ``{"domains": {name: {...}}, "failures": {...}}`` (empty if none)."""
    path = corpus_dir(cache_dir) / "record.json"
    if not path.is_file():
        return {"format": FORMAT, "domains": {}, "failures": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def _is_done(folder: Path) -> bool:
    path = folder / "record.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT


def fetch(domains="all", cache_dir=None, tokenizer=None, seed: int = 0,
          force: bool = False, echo=print) -> dict:
    """Fetch, extract and split ``domains`` into the cache; return the record.

    Idempotent: a domain with a done marker is skipped unless ``force``. Each domain is
    fetched on its own: a failure is recorded with its reason and the others go on.
    With a ``tokenizer`` the record holds token counts per split.
    """
    names = resolve_domains(domains)
    root = cache_root(cache_dir)
    out = corpus_dir(cache_dir)
    record = read_record(cache_dir)
    record["format"] = FORMAT
    for i, name in enumerate(names, 1):
        spec = DOMAINS[name]
        folder = out / name
        tag = f"[{i}/{len(names)}] {name}"
        if _is_done(folder) and not force:
            done = json.loads((folder / "record.json").read_text(encoding="utf-8"))
            if tokenizer is None or done.get("tokens"):
                echo(f"{tag}: already fetched ({done['documents']} documents)")
                record["domains"][name] = done
                record["failures"].pop(name, None)
                continue
        t0 = time.perf_counter()
        echo(f"{tag}: fetching and extracting ...")
        try:
            docs, sources = spec.extract(root)
            if not docs:
                raise RuntimeError("the sources yielded no documents")
            parts = split_corpus(docs, spec.splits, seed=seed, max_chars=spec.max_chars)
            info = {"format": FORMAT, "domain": name, "group": spec.group, "sources": sources,
                    "seed": seed, "split_fractions": spec.splits,
                    "documents_available": len(docs),
                    "chars_available": sum(len(t) for _, t in docs),
                    "max_chars": spec.max_chars,
                    "documents": sum(len(p) for p in parts.values()),
                    "splits": {}}
            for split, part in parts.items():
                info["splits"][split] = {"documents": len(part),
                                         "chars": sum(len(t) for _, t in part)}
                if tokenizer is not None:
                    echo(f"{tag}: counting tokens of {split} ({len(part)} documents)")
                    info["splits"][split]["tokens"] = count_tokens(tokenizer, [t for _, t in part])
            info["chars"] = sum(s["chars"] for s in info["splits"].values())
            if tokenizer is not None:
                info["tokens"] = sum(s["tokens"] for s in info["splits"].values())
                info["tokenizer"] = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
            for split, part in parts.items():
                write_atomic(folder / f"{split}.jsonl", "".join(
                    json.dumps({"id": i_, "text": t}, ensure_ascii=False) + "\n"
                    for i_, t in part))
            write_atomic(folder / "record.json", json.dumps(info, indent=1, ensure_ascii=False))
            record["domains"][name] = info
            record["failures"].pop(name, None)
            tokens = f", {info['tokens']:,} tokens" if "tokens" in info else ""
            test = info["splits"]["test"]
            echo(f"{tag}: {info['documents']} documents, {info['chars']:,} chars{tokens}; "
                 f"test {test['documents']} documents"
                 + (f", {test['tokens']:,} tokens" if "tokens" in test else "")
                 + f" ({time.perf_counter() - t0:.0f} s)")
        except Exception as exc:  # noqa: BLE001 - reported, and the other domains go on
            reason = f"{type(exc).__name__}: {exc}"
            log.debug("%s failed:\n%s", name, traceback.format_exc())
            record["failures"][name] = reason
            echo(f"{tag}: FAILED: {reason}")
        write_atomic(out / "record.json", json.dumps(record, indent=1, ensure_ascii=False))
    return record


def count_tokens(tokenizer, texts: list[str], batch: int = 256) -> int:
    """Tokens of ``texts`` under ``tokenizer`` (no special tokens), counted in batches."""
    total = 0
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        total += sum(len(ids) for ids in enc)
    return total


def record_table(record: dict) -> str:
    """A Markdown table of the record: domain, sources, licence, documents, chars, tokens."""
    rows = [("| domain | group | source (version) | licence | documents | chars | tokens | "
             "test tokens |"), "|---|---|---|---|---:|---:|---:|---:|"]
    for name, info in record.get("domains", {}).items():
        src = "; ".join(f"{s['package']} ({s['version']})" for s in info["sources"])
        lic = "; ".join(s["licence"] for s in info["sources"])
        tok = info.get("tokens")
        test_tok = info["splits"]["test"].get("tokens")
        rows.append(f"| {name} | {info['group']} | {src} | {lic} | {info['documents']:,} | "
                    f"{info['chars']:,} | {f'{tok:,}' if tok else '-'} | "
                    f"{f'{test_tok:,}' if test_tok else '-'} |")
    for name, why in record.get("failures", {}).items():
        rows.append(f"| {name} | | FAILED: {why} | | | | | |")
    return "\n".join(rows)
