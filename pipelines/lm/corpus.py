"""An English corpus that every Python install carries: the standard library's own prose.

Three kinds of documents, read from the stdlib's source files with ``ast`` and ``tokenize`` (never
imported, so nothing runs: no side effects, nothing can hang):

* docstrings of modules, classes and functions (``ast.get_docstring``);
* blocks of consecutive full-line ``#`` comments;
* the language reference topics that ``pydoc`` shows (the ``topics`` dict literal in
  ``pydoc_data/topics.py``, read with ``ast.literal_eval``).

Files are visited in a fixed order (``sys.stdlib_module_names`` sorted, then each package's files
sorted), so the corpus depends only on the Python version. Each document is whitespace-normalized to
one line, dropped if short or mostly symbols (code, tables), and deduplicated (first occurrence wins).
Documents go to ``valid`` when a hash of their source (module, or reference topic) falls in the
lowest ``VALID_PERCENT`` of 100 buckets, so no module is split between train and valid.

    build_corpus("runs/lm")  # writes runs/lm/train.txt and runs/lm/valid.txt, one document a line
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

VALID_PERCENT = 5
MIN_CHARS = 40      # shorter documents ("Return self.") teach little
MIN_PROSE = 0.7     # at least this fraction of a document's characters are letters or spaces
# Not prose, or not worth reading: GUI/demo code, generated codec tables, bundled wheels, jokes.
SKIP_TOP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "encodings", "ensurepip",
            "__phello__", "__hello__"}
SKIP_DIRS = {"test", "tests", "__pycache__", "site-packages"}
TOPICS = "pydoc_data.topics"

_RULE = re.compile(r"([^\w\s])\1{3,}")  # ruler lines: ----, ****, ====


def normalize(text: str) -> str:
    """One line of single-spaced text, without ruler lines (``=====``) under headings."""
    return " ".join(_RULE.sub(" ", text).split())


def is_prose(text: str) -> bool:
    return len(text) >= MIN_CHARS and sum(c.isalpha() or c == " " for c in text) >= MIN_PROSE * len(text)


def split_of(source: str) -> str:
    """``"valid"`` for about VALID_PERCENT% of sources, chosen by a stable hash of the name."""
    bucket = int.from_bytes(hashlib.sha1(source.encode()).digest()[:4], "big") % 100
    return "valid" if bucket < VALID_PERCENT else "train"


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """``(module name, path)`` of the stdlib's Python source files, in a fixed order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for top in sorted(sys.stdlib_module_names):
        if top in SKIP_TOP:
            continue
        if (root / f"{top}.py").is_file():
            files.append((top, root / f"{top}.py"))
        elif (root / top / "__init__.py").is_file():
            for path in sorted((root / top).rglob("*.py")):
                rel = path.relative_to(root).with_suffix("")
                if SKIP_DIRS.isdisjoint(rel.parts):
                    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                    files.append((".".join(parts), path))
    return files


def docstrings(tree: ast.Module) -> Iterator[str]:
    """The docstrings of a module and of its classes and functions, in source order."""
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in [tree, *sorted(nodes, key=lambda n: (n.lineno, n.col_offset))]:
        doc = ast.get_docstring(node)
        if doc:
            yield doc


def comment_blocks(source: bytes) -> Iterator[str]:
    """Runs of consecutive full-line ``#`` comments, each joined into one text."""
    block: list[str] = []
    last = -1
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
                continue
            if tok.start[0] != last + 1 and block:
                yield " ".join(block)
                block = []
            block.append(tok.string.lstrip("#!"))
            last = tok.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    if block:
        yield " ".join(block)


def reference_topics(source: bytes) -> Iterator[tuple[str, str]]:
    """``(topic, text)`` of the ``topics = {...}`` literal in pydoc_data/topics.py, by topic name."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            yield from sorted(ast.literal_eval(node.value).items())


def raw_documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """``(source, text)`` for every candidate document, unfiltered; source names the split bucket."""
    for module, path in stdlib_files(root):
        source = path.read_bytes()
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # e.g. lib2to3's Python 2 fixtures
            continue
        if module == TOPICS:
            for topic, text in reference_topics(source):
                yield f"{TOPICS}:{topic}", text
            continue
        for doc in docstrings(tree):
            yield module, doc
        for block in comment_blocks(source):
            yield module, block


def documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """``(split, text)``: normalized, filtered, deduplicated documents, in a fixed order."""
    seen: set[str] = set()
    for source, raw in raw_documents(root):
        text = normalize(raw)
        if text not in seen and is_prose(text):
            seen.add(text)
            yield split_of(source), text


def build_corpus(out: str | Path, max_bytes: int | None = None) -> dict:
    """Write ``train.txt`` and ``valid.txt`` (one document a line) under ``out``; return their stats.

    ``max_bytes`` (for a small corpus, in tests) gives each split its share (VALID_PERCENT% to
    valid), keeps the first documents that fit in it and stops when both are full, so even a small
    corpus has held-out modules.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = {"train": math.inf, "valid": math.inf}
    if max_bytes is not None:
        budget = {"train": max_bytes * (100 - VALID_PERCENT) / 100, "valid": max_bytes * VALID_PERCENT / 100}
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for split, text in documents():
        if budget[split] > 0:
            splits[split].append(text)
            budget[split] -= len(text.encode()) + 1
        elif max(budget.values()) <= 0:
            break
    stats = {}
    for split, docs in splits.items():
        data = "".join(d + "\n" for d in docs).encode()
        (out / f"{split}.txt").write_bytes(data)
        stats[split] = {"documents": len(docs), "bytes": len(data)}
    return stats


def read_documents(path: str | Path) -> list[str]:
    """The documents of a ``train.txt``/``valid.txt`` file, one a line."""
    return Path(path).read_text(encoding="utf-8").splitlines()
