"""Hugging Face fast tokenizers on disk: what identifies one, loading one, and its special-token ids.

A tokenizer is always a directory (`save_pretrained` layout: tokenizer.json, tokenizer_config.json, ...),
whether it is a tokenizer artifact of this pipeline or one the user points at. Its identity is a hash of
the files' content, so a different tokenizer at the same path is a different fingerprint downstream and
never reuses a cached tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.stage import StageInputError

# Files a tokenizer may consist of. Model weights that often sit in the same directory are not read.
TOKENIZER_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_MAX_TOKENIZER_FILE_BYTES = 512 << 20


def tokenizer_identity(path: str, field: str) -> dict[str, Any]:
    """Content hash of the tokenizer files in a local directory; a clear error naming `field` otherwise."""
    if not os.path.exists(path):
        raise StageInputError(field, f"no such tokenizer directory: {path!r}")
    if not os.path.isdir(path):
        raise StageInputError(field, f"{path!r} is a file; a tokenizer is a directory holding tokenizer.json")
    names = sorted(
        n
        for n in os.listdir(path)
        if n.endswith(TOKENIZER_FILE_SUFFIXES)
        and not n.startswith((".", "_"))  # _manifest.json of a tokenizer artifact describes, it is not the tokenizer
        and os.path.isfile(os.path.join(path, n))
        and os.path.getsize(os.path.join(path, n)) <= _MAX_TOKENIZER_FILE_BYTES
    )
    if not any(m in names for m in TOKENIZER_MARKERS):
        raise StageInputError(field, f"{path!r} holds no tokenizer (none of {', '.join(TOKENIZER_MARKERS)} is in it)")
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest(), "files": names}


_LOCAL_COPIES: dict[str, str] = {}
_LOADED: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def local_directory(url: str) -> str:
    """A local directory with the tokenizer files of `url` (copied once per process from object stores)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    with _LOCK:
        if url not in _LOCAL_COPIES:
            target = tempfile.mkdtemp(prefix="kiln-tokenizer-")
            for remote in fs.ls(path, detail=False):
                name = remote.rstrip("/").rsplit("/", 1)[-1]
                if name.endswith(TOKENIZER_FILE_SUFFIXES) and not name.startswith((".", "_")) and fs.isfile(remote):
                    fs.get(remote, os.path.join(target, name))
            _LOCAL_COPIES[url] = target
        return _LOCAL_COPIES[url]


def local_model_directory(url: str) -> str:
    """A local directory with a model artifact's top-level files (config, weights, tokenizer; not its
    `checkpoints/` or tables), copied once per machine from an object store. An artifact never changes,
    so the copy, keyed by the URL, stays valid; it appears whole or not at all (copied aside, renamed)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    base = os.path.join(tempfile.gettempdir(), "kiln-models")
    target = os.path.join(base, hashlib.sha256(url.encode()).hexdigest()[:20])
    if not os.path.isdir(target):
        os.makedirs(base, exist_ok=True)
        part = tempfile.mkdtemp(prefix=".part-", dir=base)
        for remote in fs.ls(path, detail=False):
            name = remote.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith((".", "_")) and fs.isfile(remote):
                fs.get(remote, os.path.join(part, name))
        try:
            os.rename(part, target)
        except OSError:  # another process's copy landed first
            shutil.rmtree(part, ignore_errors=True)
    return target


_IMPORT_LOCK = threading.Lock()


def from_transformers(*names: str) -> tuple[Any, ...]:
    """Names from transformers, imported under a lock: its lazy module is not safe to import from two
    threads at once (units of a stage share a worker process), and a race fails one of them with
    `cannot import name ...`."""
    with _IMPORT_LOCK:
        import transformers

        return tuple(getattr(transformers, n) for n in names)


# tokenizer_config.json classes that AutoTokenizer resolves to the generic fast tokenizer
_GENERIC_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _generic_fast(path: str) -> bool:
    """Whether AutoTokenizer would load this directory as the generic fast tokenizer (what the tokenizer
    stage writes): tokenizer.json, a tokenizer_config.json naming the generic class without remote code,
    and no model config.json or Mistral tekken.json that could make it pick another class."""
    names = set(os.listdir(path))
    if "tokenizer.json" not in names or "tokenizer_config.json" not in names or names & {"config.json", "tekken.json"}:
        return False
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict) and config.get("tokenizer_class") in _GENERIC_FAST_CLASSES and "auto_map" not in config
    )


def load_tokenizer(path: str, field: str) -> Any:
    """A transformers fast tokenizer from a local directory, never from the hub. Cached per process:
    the files' sizes and mtimes are part of the key, so a tokenizer rewritten in place is reloaded.

    The generic fast tokenizer (the tokenizer stage's output) is loaded by its class directly: AutoTokenizer
    comes to the same class, but importing it imports torch (transformers' model configs), ~1 s of a
    tokenize run that only needed the Rust tokenizer."""
    if not os.path.isdir(path):
        raise StageInputError(field, f"no such tokenizer directory: {path!r}")
    stamp = []
    for name in sorted(os.listdir(path)):
        if name.endswith(TOKENIZER_FILE_SUFFIXES):
            st = os.stat(os.path.join(path, name))
            stamp.append((name, st.st_size, st.st_mtime_ns))
    key = (os.path.abspath(path), tuple(stamp))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
    (loader,) = from_transformers("PreTrainedTokenizerFast" if _generic_fast(path) else "AutoTokenizer")
    try:
        tok = loader.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for unusable directories
        raise StageInputError(field, f"cannot load a tokenizer from {path!r}: {type(e).__name__}: {e}") from e
    if not _has_fast_backend(tok):
        raise StageInputError(field, f"{path!r} is not a fast (Rust `tokenizers`) tokenizer")
    with _LOCK:
        _LOADED[key] = tok
    return tok


def load_hub_tokenizer(name: str, revision: str | None) -> Any:
    """For users with internet only: tests and the demo never come here."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as e:
        raise StageInputError(
            "hub_name", f"cannot load tokenizer {name!r} from the hub: {type(e).__name__}: {e}"
        ) from e
    if not _has_fast_backend(tok):
        raise StageInputError("hub_name", f"{name!r} has no fast (Rust `tokenizers`) tokenizer")
    return tok


def _has_fast_backend(tok: Any) -> bool:
    from tokenizers import Tokenizer

    return isinstance(getattr(tok, "backend_tokenizer", None), Tokenizer)


def tokenizer_info(tok: Any) -> dict[str, Any]:
    """What downstream stages need without loading the tokenizer: ids of the special tokens."""
    return {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
    }


def copy_tokenizer_files(src_dir: str, fs: fsspec.AbstractFileSystem, dest_dir: str) -> list[str]:
    """Copy a local tokenizer directory's files into `dest_dir` on `fs` (local or object store)."""
    copied = []
    fs.makedirs(dest_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if not name.endswith(TOKENIZER_FILE_SUFFIXES) or name.startswith((".", "_")) or not os.path.isfile(src):
            continue
        dest = f"{dest_dir.rstrip('/')}/{name}"
        if isinstance(fs, LocalFileSystem):
            shutil.copyfile(src, dest)
        else:
            fs.put(src, dest)
        copied.append(name)
    return copied
