"""Text data for ``--data``: a column of strings, tokenized into token items.

Where the text is (the spec):

* a Parquet file (``.parquet``), a JSON Lines file (``.jsonl``; ``.json`` holds JSON Lines or one
  array of objects), or a directory of them (its ``*.parquet`` files, else its ``*.jsonl``, else
  its ``*.json``, in name order);
* a Hugging Face ``datasets`` directory, as ``Dataset.save_to_disk`` writes it (``state.json`` and
  ``dataset_info.json`` beside Arrow files): read with pyarrow, so the ``datasets`` package is not
  needed (a ``DatasetDict`` directory is refused, naming its splits: give one split's directory);
* any of these as ``text:PATH``, which is how a path holding ``:`` is given.

Each row's text (``--text-column``, default ``text``) is tokenized with ``--tokenizer DIR``
(default: the directory of the ``hf:`` model, the teacher in ``dump``, the student in ``train``),
special tokens added, truncated to ``--max-length`` tokens (default: the tokenizer's
``model_max_length``, at most 512, and at most the model's position embeddings). An item is a
token item (:mod:`kdcache.sources.tokens`): ``{"input_ids", "attention_mask"}``, 1-D int64 tensors
without padding, and ``"label"`` (an int, -1 for a null) with ``--label-column``.

Every row is read, checked and tokenized once, when the dataset is loaded, in batched calls of the
tokenizer (tens of thousands of sentences a second); the token ids are kept in one flat array.
A null, empty or non-string text is an error naming the file and the row.

The data fingerprint is computed from the items, so it changes with the tokenizer and with the
maximum length wherever they change a fingerprinted item (``--data-check full``: any item).
"""

from __future__ import annotations

import itertools
import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError, DataError, SpecError
from kdcache.sources import hf
from kdcache.sources.items import NO_LABEL
from kdcache.sources.tokens import IDS, MASK

PREFIX = "text:"
SUFFIXES = (".parquet", ".jsonl", ".json")
DEFAULT_MAX_LENGTH = 512
TOKENIZE_BLOCK = 4096  # texts per tokenizer call
DATASETS_FILES = ("state.json", "dataset_info.json")  # a directory Dataset.save_to_disk wrote


@dataclass(frozen=True)
class TextOptions:
    """How text data becomes token items: the flags ``--tokenizer``, ``--text-column``,
    ``--label-column`` and ``--max-length``, and the model whose ``hf:`` directory the tokenizer
    defaults to (``model``, given as ``model_flag``)."""

    tokenizer: str | None = None
    text_column: str = "text"
    label_column: str | None = None
    max_length: int | None = None
    model: str | None = None
    model_flag: str = "--teacher"

    @classmethod
    def from_config(cls, cfg: Any, model_flag: str) -> TextOptions:
        """The options of a ``DumpConfig`` (``model_flag="--teacher"``) or ``TrainConfig`` (``"--student"``)."""
        return cls(tokenizer=cfg.tokenizer, text_column=cfg.text_column, label_column=cfg.label_column,
                   max_length=cfg.max_length, model=getattr(cfg, model_flag.lstrip("-")), model_flag=model_flag)

    def given(self) -> list[str]:
        """The text flags set to something other than their default."""
        defaults = TextOptions()
        return [f"--{name.replace('_', '-')}" for name in ("tokenizer", "text_column", "label_column", "max_length")
                if getattr(self, name) != getattr(defaults, name)]


def is_text_spec(spec: Any) -> bool:
    """``text:PATH``, or a path without ``:`` that ends in .parquet/.jsonl/.json or is a directory."""
    if not isinstance(spec, str) or not spec:
        return False
    if spec.startswith(PREFIX):
        return True
    if ":" in spec:
        return False
    return spec.lower().endswith(SUFFIXES) or Path(spec).expanduser().is_dir()


# --- the dataset --------------------------------------------------------------------------------
class TextDataset(torch.utils.data.Dataset):
    """Tokenized rows of text: item ``i`` is ``{"input_ids", "attention_mask"[, "label"]}``.

    ``ids``: every row's token ids, one after another; ``offsets``: row ``i`` is
    ``ids[offsets[i]:offsets[i + 1]]``; ``labels``: an int per row (-1: none), or None.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, labels: np.ndarray | None = None,
                 description: str = "text") -> None:
        self.ids, self.offsets, self.labels = ids, offsets, labels
        self.description = description

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} of {n}")
        ids = torch.from_numpy(self.ids[self.offsets[i]:self.offsets[i + 1]].astype(np.int64))
        item: dict[str, Any] = {IDS: ids, MASK: torch.ones(len(ids), dtype=torch.int64)}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item

    def lengths(self) -> np.ndarray:
        """Tokens of every item (what :func:`kdcache.sources.tokens.lengths` reads without reading items)."""
        return np.diff(self.offsets)

    def __repr__(self) -> str:
        return f"TextDataset({len(self)} rows, {int(self.offsets[-1]):,} tokens: {self.description})"


def load_text(spec: str, options: TextOptions | None = None, flag: str = "--data") -> TextDataset:
    """Read, check and tokenize the text data ``spec`` names (module docstring)."""
    options = options or TextOptions()
    _check_options(options)
    path_text = spec.removeprefix(PREFIX)
    where = f"{flag} {spec}"
    if not path_text:
        raise SpecError(f"{where}: expected text:PATH, a .parquet, .jsonl or .json file or a directory of them")
    rows = _read(Path(path_text).expanduser(), options, where)
    tokenizer_dir, tokenizer_where = _tokenizer_dir(options, where)
    tokenizer = hf.load_tokenizer(tokenizer_dir, tokenizer_where)
    max_length = _max_length(options, tokenizer, tokenizer_dir)
    ids, offsets = _tokenize(tokenizer, rows, max_length, where)
    labels = None if options.label_column is None else np.asarray(rows.labels, dtype=np.int64)
    description = (f"{path_text}, column {options.text_column!r}, tokenizer {tokenizer_dir}, "
                   f"max length {max_length}")
    return TextDataset(ids, offsets, labels, description)


def _check_options(options: TextOptions) -> None:
    if not isinstance(options.text_column, str) or not options.text_column:
        raise ConfigError(f"--text-column: expected a column name, got {options.text_column!r}")
    if options.label_column is not None and (not isinstance(options.label_column, str) or not options.label_column):
        raise ConfigError(f"--label-column: expected a column name, got {options.label_column!r}")
    m = options.max_length
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
        raise ConfigError(f"--max-length must be a positive integer, got {m!r}")


def _tokenizer_dir(options: TextOptions, where: str) -> tuple[str, str]:
    """The tokenizer's directory, and how to name it in an error."""
    if options.tokenizer:
        return hf.hf_dir(options.tokenizer), f"--tokenizer {options.tokenizer}"
    if hf.is_hf_spec(options.model):
        directory = hf.hf_dir(options.model)
        if Path(directory).expanduser().is_dir() and not hf.has_tokenizer(Path(directory).expanduser()):
            raise SpecError(f"{options.model_flag} {options.model}: {directory!r} holds no tokenizer (none of "
                            f"{', '.join(hf.TOKENIZER_FILES)}), and text data ({where}) needs one: "
                            "pass --tokenizer DIR")
        return directory, f"{options.model_flag} {options.model} (its tokenizer)"
    model = f" ({options.model_flag} {options.model} is not an hf: model)" if options.model else ""
    raise ConfigError(f"--tokenizer DIR is required for text data ({where}){model}")


def _max_length(options: TextOptions, tokenizer: Any, tokenizer_dir: str) -> int:
    """``--max-length``, checked against the model's positions; by default the tokenizer's
    ``model_max_length``, at most 512 and at most the model's positions."""
    model_dir = hf.hf_dir(options.model) if hf.is_hf_spec(options.model) else None
    limit = hf.position_limit(Path(model_dir or tokenizer_dir).expanduser())
    if options.max_length is not None:
        if model_dir is not None and limit is not None and options.max_length > limit:
            raise ConfigError(f"--max-length {options.max_length} is more than {options.model_flag} {options.model} "
                              f"takes ({limit} positions in its config.json); give at most {limit}")
        return options.max_length
    candidates = [DEFAULT_MAX_LENGTH] + ([limit] if limit else [])
    own = getattr(tokenizer, "model_max_length", None)
    if isinstance(own, int) and 0 < own:
        candidates.append(own)
    return min(candidates)


# --- reading ------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """Every row's text and label, and where each came from (to name a row in an error)."""

    texts: list[Any]
    labels: list[int]
    parts: list[tuple[Path, int, list[int] | None]]  # (file, first row, line of each row or None)

    def where(self, row: int) -> str:
        for file, first, lines in reversed(self.parts):
            if row >= first:
                local = row - first
                line = f" (line {lines[local]})" if lines is not None else ""
                item = f", item {row}" if first else ""
                return f"{file}: row {local}{line}{item}"
        return f"row {row}"


def _read(path: Path, options: TextOptions, where: str) -> _Rows:
    files = _files(path, where)
    rows = _Rows([], [], [])
    for kind, file in files:
        texts, labels, lines = _READERS[kind](file, options, where)
        rows.parts.append((file, len(rows.texts), lines))
        rows.texts.extend(texts)
        rows.labels.extend(labels)
    if not rows.texts:
        raise DataError(f"{where}: no rows (in {', '.join(str(f) for _, f in files)})")
    return rows


def _files(path: Path, where: str) -> list[tuple[str, Path]]:
    """``(kind, file)`` of the text data at ``path``, in order."""
    if not path.exists():
        raise SpecError(f"{where}: {'directory' if not path.suffix else 'file'} {str(path)!r} does not exist")
    if path.is_file():
        kind = _kind(path)
        if kind is None:
            raise SpecError(f"{where}: {str(path)!r} is not a .parquet, .jsonl or .json file")
        return [(kind, path)]
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "state.json").is_file())
        example = str(path / (splits[0] if splits else "train"))
        raise SpecError(f"{where}: {str(path)!r} is a datasets DatasetDict (splits: {', '.join(splits) or 'none'}); "
                        f"give one split's directory, e.g. {example!r}")
    if any((path / name).is_file() for name in DATASETS_FILES):
        return [("arrow", file) for file in _datasets_files(path, where)]
    for suffix in SUFFIXES:
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(suffix))
        if found:
            return [(_kind(p), p) for p in found]
    raise SpecError(f"{where}: directory {str(path)!r} holds no .parquet, .jsonl or .json files, and is not a "
                    "datasets directory (state.json, dataset_info.json)")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return "parquet" if name.endswith(".parquet") else "jsonl" if name.endswith(".jsonl") else \
        "json" if name.endswith(".json") else None


def _datasets_files(path: Path, where: str) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in the order its state.json lists them."""
    state_file = path / "state.json"
    if not state_file.is_file():
        found = sorted(path.glob("data-*.arrow"))
        if not found:
            raise SpecError(f"{where}: datasets directory {str(path)!r} has no state.json and no data-*.arrow files")
        return found
    try:
        state = json.loads(state_file.read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{where}: cannot read {state_file} (as datasets' save_to_disk writes it): "
                        f"{type(e).__name__}: {e}") from None
    if state.get("_indices_data_files"):
        raise SpecError(f"{where}: {str(path)!r} was saved with an indices mapping (an old datasets version); "
                        "save it again with a current datasets, which writes the rows themselves")
    files = [path / name for name in names]
    for file in files:
        if not file.is_file():
            raise SpecError(f"{where}: {state_file} lists {file.name!r}, which does not exist")
    return files


def _read_parquet(file: Path, options: TextOptions, where: str) -> tuple[list, list, None]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(file).names
        _check_columns(names, options, file, where)
        table = pq.read_table(file, columns=_columns(options))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{where}: cannot read {file} as Parquet: {e}") from None
    return (*_arrow_columns(table, options, file, where), None)


def _read_arrow(file: Path, options: TextOptions, where: str) -> tuple[list, list, None]:
    """An Arrow file of a datasets directory: the IPC stream format (the file format too)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read {file} as Arrow: {e}") from None
    _check_columns(table.column_names, options, file, where)
    return (*_arrow_columns(table.select(_columns(options)), options, file, where), None)


def _columns(options: TextOptions) -> list[str]:
    return [options.text_column] + ([options.label_column] if options.label_column else [])


def _check_columns(names: list[str], options: TextOptions, file: Path, where: str) -> None:
    for flag, column in (("--text-column", options.text_column), ("--label-column", options.label_column)):
        if column is not None and column not in names:
            raise DataError(f"{flag} {column}: {file} has no column {column!r} (its columns: "
                            f"{', '.join(map(repr, names)) or 'none'}) ({where})")


def _arrow_columns(table: Any, options: TextOptions, file: Path, where: str) -> tuple[list, list]:
    import pyarrow as pa

    text = table.column(options.text_column)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)
            or getattr(pa.types, "is_string_view", lambda t: False)(text.type)):
        values = text.to_pylist()
        row = next((i for i, v in enumerate(values) if v is not None), 0)
        raise DataError(f"--text-column {options.text_column}: {file}: row {row}: expected a string, got "
                        f"{text.type} {values[row]!r} (the column holds {text.type} values) ({where})")
    texts = text.to_pylist()
    if options.label_column is None:
        return texts, []
    label = table.column(options.label_column)
    if not pa.types.is_integer(label.type):
        values = label.to_pylist()
        row = next((i for i, v in enumerate(values) if v is not None), 0)
        raise DataError(f"--label-column {options.label_column}: {file}: row {row}: expected an integer class id, "
                        f"got {label.type} {values[row]!r} (the column holds {label.type} values) ({where})")
    return texts, [NO_LABEL if v is None else v for v in label.to_pylist()]


_MISSING = object()


def _read_jsonl(file: Path, options: TextOptions, where: str) -> tuple[list, list, list[int]]:
    """JSON Lines: an object a line (blank lines skipped), or a ``.json`` file holding one array."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: {file} is not UTF-8 text: {e}") from None
    if file.name.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as e:
            raise DataError(f"{where}: {file} is not valid JSON: {e}") from None
        numbered = [(None, r) for r in records]
    else:
        numbered = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((line_no, json.loads(line)))
                except ValueError as e:
                    raise DataError(f"{where}: {file} line {line_no} is not valid JSON: {e}") from None
    keys: dict[str, None] = {}
    for row, (line_no, record) in enumerate(numbered):
        if not isinstance(record, dict):
            at = f"line {line_no}" if line_no else f"row {row}"
            raise DataError(f"{where}: {file} {at} is a JSON {type(record).__name__}; expected an object "
                            f"with a {options.text_column!r} key")
        keys.update(dict.fromkeys(record))
    if numbered:
        _check_columns(list(keys), options, file, where)
    texts = [record.get(options.text_column, _MISSING) for _, record in numbered]
    for row, value in enumerate(texts):
        if value is _MISSING:
            raise DataError(f"--text-column {options.text_column}: {file}: row {row}{_line(numbered[row][0])} has no "
                            f"{options.text_column!r} key ({where})")
        if value is not None and not isinstance(value, str):
            raise DataError(f"--text-column {options.text_column}: {file}: row {row}{_line(numbered[row][0])}: "
                            f"expected a string, got {type(value).__name__} {value!r} ({where})")
    labels = []
    if options.label_column is not None:
        for row, (line_no, record) in enumerate(numbered):
            value = record.get(options.label_column)
            if value is None:
                labels.append(NO_LABEL)
            elif isinstance(value, int) and not isinstance(value, bool):
                labels.append(value)
            else:
                raise DataError(f"--label-column {options.label_column}: {file}: row {row}{_line(line_no)}: expected "
                                f"an integer class id, got {type(value).__name__} {value!r} ({where})")
    lines = None if numbered and numbered[0][0] is None else [line_no for line_no, _ in numbered]
    return texts, labels, lines


def _line(line_no: int | None) -> str:
    return f" (line {line_no})" if line_no is not None else ""


_READERS = {"parquet": _read_parquet, "arrow": _read_arrow, "jsonl": _read_jsonl, "json": _read_jsonl}


# --- tokenizing ---------------------------------------------------------------------------------
def _tokenize(tokenizer: Any, rows: _Rows, max_length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row's token ids in one flat int32 array (int64 where the vocabulary needs it), and
    the offsets of the rows in it."""
    for row, text in enumerate(rows.texts):
        if text is None or not text.strip():
            what = "null" if text is None else "empty" if not text else "only whitespace"
            raise DataError(f"{where}: {rows.where(row)}: the text is {what}; every row needs text")
    import transformers

    lengths = np.empty(len(rows.texts), dtype=np.int64)
    blocks = []
    with hf.quiet(transformers):
        for start in range(0, len(rows.texts), TOKENIZE_BLOCK):
            encoded = tokenizer(rows.texts[start:start + TOKENIZE_BLOCK], truncation=True, max_length=max_length,
                                add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False)
            ids = encoded["input_ids"]
            lengths[start:start + len(ids)] = [len(x) for x in ids]
            blocks.append(ids)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise DataError(f"{where}: {rows.where(int(empty[0]))}: the tokenizer made no tokens of this text")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(blocks)), dtype=np.int64,
                       count=int(offsets[-1]))
    if flat.size and flat.max() < 2**31 and flat.min() >= 0:
        flat = flat.astype(np.int32)
    return flat, offsets
