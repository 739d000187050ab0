"""``hf:DIR`` model specs: a local Hugging Face ``transformers`` model directory.

``DIR`` holds ``config.json`` and weights (``*.safetensors`` or ``pytorch_model*.bin``), as
``save_pretrained`` writes them. The model class is the one ``config.json`` records
(``architectures[0]``: ``BertModel``, ``GPT2LMHeadModel``, ``BertForSequenceClassification``...),
or ``AutoModel`` where it records none, loaded with ``from_pretrained(DIR, local_files_only=True)``
in float32: nothing is downloaded, and a model's own code (``trust_remote_code``) never runs.

kdcache calls ``model(input_ids=..., attention_mask=...)``; the model is loaded to return a
``ModelOutput`` (``return_dict=True``) whose ``.logits`` kdcache reads, without a key/value cache
(``use_cache=False``). The teacher fingerprint covers the weights (as for any module) and the
configuration: :func:`load_model` records the config as a plain attribute, which the code digest
hashes (:mod:`kdcache.fingerprint`), and clears ``name_or_path`` so that the same model in another
directory, or typed as another path, has the same fingerprint.

A trained student is saved as ``student.pt`` (a state dict); :func:`save_student` turns it back
into a directory that ``from_pretrained`` (and ``hf:``) loads.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import SpecError

PREFIX = "hf:"
CONFIG = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# What a tokenizer directory holds: a fast tokenizer, a WordPiece or BPE vocabulary, a sentencepiece model.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# The files of a tokenizer that save_student copies next to the weights.
TOKENIZER_EXTRAS = TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json", "merges.txt",
                                      "added_tokens.json", "generation_config.json")
# Where configs keep the longest sequence the model takes (its position embeddings).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
CONFIG_ATTRIBUTE = "kdcache_hf_config"  # the config as JSON: a plain attribute, so the teacher digest hashes it


def is_hf_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def hf_dir(spec: str) -> str:
    """``DIR`` of ``hf:DIR`` (a plain path is returned as it is)."""
    return spec[len(PREFIX):] if is_hf_spec(spec) else spec


def import_transformers(flag: str, what: str) -> Any:
    """The ``transformers`` module, or a one-line error naming ``flag`` and how to install it."""
    try:
        import transformers
    except ImportError:
        where = " ".join(filter(None, (flag, what)))
        raise SpecError(f"{where}: needs the transformers package, which is not installed: pip install transformers "
                        "(or pip install 'kdcache[hf]')") from None
    return transformers


@contextlib.contextmanager
def quiet(transformers: Any):
    """No progress bars ("Loading weights") or warnings from transformers while it loads a model:
    kdcache reports what matters itself. Transformers' own settings are restored after."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def model_dir(spec: str, flag: str) -> Path:
    """The directory of ``hf:DIR``, checked: it exists, holds ``config.json`` and weights."""
    path = Path(hf_dir(spec)).expanduser()
    where = f"{flag} {spec}"
    if not hf_dir(spec):
        raise SpecError(f"{where}: expected hf:DIR, a local transformers model directory")
    if not path.exists():
        raise SpecError(f"{where}: directory {str(path)!r} does not exist (hf: loads local directories only; "
                        "nothing is downloaded)")
    if not path.is_dir():
        raise SpecError(f"{where}: {str(path)!r} is a file; expected a transformers model directory "
                        "(config.json and weights, as save_pretrained writes them)")
    if not (path / CONFIG).is_file():
        raise SpecError(f"{where}: {str(path)!r} has no config.json; expected a transformers model directory "
                        "(as save_pretrained writes it)")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise SpecError(f"{where}: {str(path)!r} has no weights (no *.safetensors or pytorch_model.bin); "
                        "expected a directory save_pretrained wrote")
    return path


def read_config(path: Path, flag: str, spec: str) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpecError(f"{flag} {spec}: cannot read {path / CONFIG}: {e}") from None
    if not isinstance(config, dict):
        raise SpecError(f"{flag} {spec}: {path / CONFIG} holds a {type(config).__name__}, expected a JSON object")
    return config


def architecture(config: dict[str, Any]) -> str | None:
    """``architectures[0]`` of a config, or None where it records none."""
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return None


def load_model(spec: str, flag: str = "--teacher") -> nn.Module:
    """The model of ``hf:DIR`` (module docstring); every error is one line naming ``flag``."""
    path = model_dir(spec, flag)
    config = read_config(path, flag, spec)
    transformers = import_transformers(flag, spec)
    name = architecture(config)
    try:
        cls = getattr(transformers, name, None) if name else transformers.AutoModel
    except Exception:  # noqa: BLE001 - a class whose optional dependency is missing: the lazy module raises
        cls = None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise SpecError(f"{flag} {spec}: config.json names architecture {name!r}, which transformers "
                        f"{transformers.__version__} does not have (kdcache does not run a model's own code: "
                        "trust_remote_code is off)")
    try:
        with quiet(transformers):
            model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                              **{_dtype_keyword(transformers): torch.float32})
    except Exception as e:  # noqa: BLE001 - a corrupt file, a config that does not fit the weights...
        raise SpecError(f"{flag} {spec}: loading {name or 'AutoModel'} failed: {_one_line(e)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise SpecError(f"{flag} {spec}: the weights in {str(path)!r} do not fit {type(model).__name__}: "
                        f"{len(missing)} tensors are missing (first: {missing[0]!r}), which would be random")
    _prepare(model)
    return model


def _dtype_keyword(transformers: Any) -> str:
    """``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    try:
        version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if version >= (4, 56) else "torch_dtype"


def _prepare(model: nn.Module) -> None:
    """Outputs kdcache reads (``.logits``, no key/value cache), and a path-independent fingerprint."""
    config = model.config
    config.return_dict = True
    if hasattr(config, "use_cache"):
        config.use_cache = False
    for module in model.modules():
        if hasattr(module, "name_or_path") and isinstance(module.name_or_path, str):
            module.name_or_path = ""  # the directory it came from: not part of what the model is
    setattr(model, CONFIG_ATTRIBUTE, config_json(config))


def config_json(config: Any) -> str:
    """The config as the fingerprint sees it: every setting, without where it was loaded from or
    the transformers version that wrote it (the classes' source covers the code), plus the
    attention implementation (sdpa, eager...), which ``to_dict`` leaves out."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version"):
        d.pop(key, None)
    d["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.dumps(d, sort_keys=True, default=repr)


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, where: str | None = None) -> Any:
    """The tokenizer saved in directory ``path`` (``AutoTokenizer``, local files only); errors
    start with ``where`` (default ``--tokenizer PATH``)."""
    where = where or f"--tokenizer {path}"
    path = Path(hf_dir(str(path))).expanduser()
    if not path.is_dir():
        raise SpecError(f"{where}: directory {str(path)!r} does not exist" if not path.exists() else
                        f"{where}: {str(path)!r} is a file; expected a directory holding a tokenizer")
    if not has_tokenizer(path):
        raise SpecError(f"{where}: {str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "pass --tokenizer DIR with one")
    transformers = import_transformers(where, "")
    try:
        with quiet(transformers):
            return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer's files make transformers raise
        if (path / "tokenizer.json").is_file():  # no tokenizer_config.json / config.json to say which class
            with contextlib.suppress(Exception), quiet(transformers):
                return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        raise SpecError(f"{where}: loading its tokenizer failed: {_one_line(e)}") from None


def position_limit(path: str | Path) -> int | None:
    """The longest sequence the model in ``path`` takes, from its config.json; None if unknown."""
    try:
        config = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    found = [config[key] for key in POSITION_KEYS
             if isinstance(config.get(key), int) and not isinstance(config.get(key), bool) and config[key] > 0]
    return min(found) if found else None


def save_student(state_dict: str | Path | dict[str, torch.Tensor], base_dir: str | Path,
                 out_dir: str | Path) -> Path:
    """Write a trained ``hf:`` student as a transformers directory, and return ``out_dir``.

    ``state_dict``: the run's ``student.pt`` (or the state dict itself); ``base_dir``: the
    ``--student hf:DIR`` it was trained from (architecture, config, tokenizer). ``out_dir`` gets
    ``config.json``, the trained weights (``model.safetensors``) and the base's tokenizer files,
    and loads with ``from_pretrained(out_dir)`` or as ``hf:out_dir``.
    """
    from kdcache.sources.specs import load_checkpoint

    flag = "save_student"
    model = load_model(f"{PREFIX}{base_dir}", flag)
    state = state_dict if isinstance(state_dict, dict) else load_checkpoint(str(state_dict))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f"{flag}: the state dict does not fit hf:{base_dir}: {_one_line(e)}") from None
    if hasattr(model.config, "use_cache"):  # load_model turned the cache off for kdcache's forwards
        model.config.use_cache = read_config(Path(base_dir), flag, str(base_dir)).get("use_cache", True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers = import_transformers(flag, str(base_dir))
    with quiet(transformers):
        model.save_pretrained(str(out))
    for name in TOKENIZER_EXTRAS:
        source = Path(base_dir) / name
        if source.is_file() and not (out / name).exists():
            shutil.copyfile(source, out / name)
    return out


def _one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
