"""Document filters: each a small class whose `check` answers None (keep) or (reason, detail) (drop).

Some also edit the text (`edit`): in-document repeated line removal, C4's line rules. Reasons are
"<filter>:<rule>", e.g. "gopher_repetition:dup_line_frac", so rejects can be counted per rule.
The thresholds' defaults follow the papers they come from (Gopher: Rae et al. 2021, C4: Raffel et al.
2020, FineWeb: Penedo et al. 2024), whose numbers were tuned on web text.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

Verdict = tuple[str, str] | None  # (reason, detail) to drop; None to keep


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Apply this filter.")


@dataclass
class Doc:
    """What filters look at: the text, and words/lines computed once and shared between filters."""

    text: str
    _words: list[str] | None = None
    _lines: list[str] | None = None

    def set_text(self, text: str) -> None:
        self.text, self._words, self._lines = text, None, None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = self.text.split()
        return self._words

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = self.text.split("\n")
        return self._lines


def _frac(x: float, y: float) -> float:
    return x / y if y else 0.0


# --------------------------------------------------------------------------------------------------
# normalisation


class NormaliseConfig(FilterConfig):
    nfc: bool = Field(True, description="Unicode NFC composition (é as one code point, not e + accent).")
    control_chars: bool = Field(True, description="Remove control characters other than newline and tab.")
    whitespace: bool = Field(True, description="Collapse runs of spaces/tabs, trim line ends, at most one blank line.")
    fix_mojibake: bool = Field(False, description="Repair mis-decoded text with ftfy (e.g. 'CafÃ©' -> 'Café'); slower.")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


class Normaliser:
    name = "normalise"

    def __init__(self, cfg: NormaliseConfig):
        self.cfg = cfg

    def edit(self, text: str, is_code: bool = False) -> str:
        """Code keeps its whitespace: indentation and blank lines are syntax or layout there."""
        cfg = self.cfg
        if cfg.fix_mojibake:
            import ftfy

            text = ftfy.fix_text(text, normalization="NFC" if cfg.nfc else None)
        elif cfg.nfc and not text.isascii():
            text = unicodedata.normalize("NFC", text)
        if cfg.control_chars:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            text = _CONTROL.sub("", text)
        if cfg.whitespace and not is_code:
            text = _SPACES.sub(" ", text)
            text = "\n".join(line.strip() for line in text.split("\n"))
            text = _BLANKS.sub("\n\n", text).strip()
        return text


# --------------------------------------------------------------------------------------------------
# length


class LengthConfig(FilterConfig):
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this many characters.")
    max_chars: int = Field(1_000_000, ge=1, description="Drop documents longer than this (a 50 MB blob is not prose).")
    min_words: int = Field(5, ge=0, description="Drop documents with fewer whitespace-separated words.")
    max_words: int = Field(200_000, ge=1, description="Drop documents with more words.")


class LengthFilter:
    name = "length"

    def __init__(self, cfg: LengthConfig):
        self.cfg = cfg

    def check(self, doc: Doc) -> Verdict:
        c, n = self.cfg, len(doc.text)
        if n < c.min_chars:
            return "length:too_short_chars", f"{n} chars < {c.min_chars}"
        if n > c.max_chars:
            return "length:too_long_chars", f"{n} chars > {c.max_chars}"
        w = len(doc.words)
        if w < c.min_words:
            return "length:too_short_words", f"{w} words < {c.min_words}"
        if w > c.max_words:
            return "length:too_long_words", f"{w} words > {c.max_words}"
        return None


# --------------------------------------------------------------------------------------------------
# repetition (Gopher) and in-document dedup


class RepetitionConfig(FilterConfig):
    dup_line_frac: float = Field(0.30, ge=0, le=1, description="Max fraction of lines that repeat an earlier line.")
    dup_para_frac: float = Field(0.30, ge=0, le=1, description="Max fraction of paragraphs that repeat an earlier one.")
    dup_line_char_frac: float = Field(0.20, ge=0, le=1, description="Max fraction of characters in repeated lines.")
    dup_para_char_frac: float = Field(
        0.20, ge=0, le=1, description="Max fraction of characters in repeated paragraphs."
    )
    top_ngram_char_frac: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max fraction of characters covered by the most frequent word n-gram.",
    )
    dup_ngram_char_frac: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max fraction of characters in word n-grams that occur more than once.",
    )


def _dup_stats(parts: list[str]) -> tuple[int, int]:
    """(repeated elements, characters in them): elements equal to an earlier one."""
    seen: set[str] = set()
    n = chars = 0
    for p in parts:
        if p in seen:
            n += 1
            chars += len(p)
        else:
            seen.add(p)
    return n, chars


class GopherRepetitionFilter:
    name = "gopher_repetition"

    def __init__(self, cfg: RepetitionConfig):
        self.cfg = cfg

    def check(self, doc: Doc) -> Verdict:
        c, text = self.cfg, doc.text
        total = len(text) or 1
        paras = [p.strip() for p in re.split(r"\n{2,}", text) if p.strip()]
        n, chars = _dup_stats(paras)
        if _frac(n, len(paras)) > c.dup_para_frac:
            return "gopher_repetition:dup_para_frac", f"{n}/{len(paras)} paragraphs repeat"
        if chars / total > c.dup_para_char_frac:
            return "gopher_repetition:dup_para_char_frac", f"{chars / total:.2f} of chars in repeated paragraphs"
        lines = [line.strip() for line in doc.lines if line.strip()]
        n, chars = _dup_stats(lines)
        if _frac(n, len(lines)) > c.dup_line_frac:
            return "gopher_repetition:dup_line_frac", f"{n}/{len(lines)} lines repeat"
        if chars / total > c.dup_line_char_frac:
            return "gopher_repetition:dup_line_char_frac", f"{chars / total:.2f} of chars in repeated lines"
        words = doc.words
        word_chars = sum(len(w) for w in words) or 1
        for n_, limit in sorted(c.top_ngram_char_frac.items()):
            if len(words) < n_:
                continue
            grams = Counter(zip(*(words[i:] for i in range(n_))))
            gram, count = grams.most_common(1)[0]
            if count > 1:
                frac = count * sum(len(w) for w in gram) / word_chars
                if frac > limit:
                    return f"gopher_repetition:top_{n_}gram_char_frac", f"{' '.join(gram)!r} covers {frac:.2f}"
        for n_, limit in sorted(c.dup_ngram_char_frac.items()):
            if len(words) < n_:
                continue
            seen: set[tuple[str, ...]] = set()
            covered = [False] * len(words)
            for i in range(len(words) - n_ + 1):
                g = tuple(words[i : i + n_])
                if g in seen:
                    for k in range(i, i + n_):
                        covered[k] = True
                else:
                    seen.add(g)
            frac = sum(len(w) for w, cov in zip(words, covered) if cov) / word_chars
            if frac > limit:
                return f"gopher_repetition:dup_{n_}gram_char_frac", f"{frac:.2f} of chars in repeated {n_}-grams"
        return None


class InDocDedupConfig(FilterConfig):
    lines: bool = Field(True, description="Remove lines that repeat an earlier line of the same document.")
    paragraphs: bool = Field(True, description="Remove paragraphs that repeat an earlier paragraph.")
    min_line_chars: int = Field(10, ge=0, description="Shorter lines (blank, '}', '---') are kept even if repeated.")


class InDocDedup:
    """Removes repeats inside one document (navigation, footers pasted twice); keeps the first copy."""

    name = "in_doc_dedup"

    def __init__(self, cfg: InDocDedupConfig):
        self.cfg = cfg

    def edit(self, text: str) -> tuple[str, int]:
        removed = 0
        if self.cfg.paragraphs and "\n\n" in text:
            seen: set[str] = set()
            out = []
            for p in text.split("\n\n"):
                key = p.strip()
                if key and len(key) >= self.cfg.min_line_chars and key in seen:
                    removed += 1
                    continue
                seen.add(key)
                out.append(p)
            text = "\n\n".join(out)
        if self.cfg.lines:
            seen = set()
            out = []
            for line in text.split("\n"):
                key = line.strip()
                if len(key) >= self.cfg.min_line_chars and key in seen:
                    removed += 1
                    continue
                seen.add(key)
                out.append(line)
            text = "\n".join(out)
        return text, removed


# --------------------------------------------------------------------------------------------------
# quality heuristics


STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·", "➢", "►")


class GopherQualityConfig(FilterConfig):
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, ge=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="Max ('#' + '...' + '…') per word.")
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1, description="Max fraction of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = Field(
        0.3, ge=0, le=1, description="Max fraction of lines ending with an ellipsis."
    )
    min_alpha_words_ratio: float = Field(0.8, ge=0, le=1, description="Min fraction of words with a letter.")
    min_stop_words: int = Field(2, ge=0, description="Min count of English stop words (the, be, to, of, ...).")


class GopherQualityFilter:
    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig):
        self.cfg = cfg

    def check(self, doc: Doc) -> Verdict:
        c, words = self.cfg, doc.words
        n = len(words)
        if n < c.min_words:
            return "gopher_quality:too_few_words", f"{n} < {c.min_words}"
        if n > c.max_words:
            return "gopher_quality:too_many_words", f"{n} > {c.max_words}"
        mean = sum(len(w) for w in words) / n
        if mean < c.min_mean_word_length or mean > c.max_mean_word_length:
            return "gopher_quality:mean_word_length", f"{mean:.2f}"
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
        if symbols / n > c.max_symbol_word_ratio:
            return "gopher_quality:symbol_word_ratio", f"{symbols / n:.3f}"
        lines = [line for line in doc.lines if line.strip()]
        if lines:
            bullets = sum(line.lstrip().startswith(_BULLETS) for line in lines)
            if bullets / len(lines) > c.max_bullet_lines_ratio:
                return "gopher_quality:bullet_lines_ratio", f"{bullets}/{len(lines)}"
            ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
            if ellipsis / len(lines) > c.max_ellipsis_lines_ratio:
                return "gopher_quality:ellipsis_lines_ratio", f"{ellipsis}/{len(lines)}"
        alpha = sum(any(ch.isalpha() for ch in w) for w in words)
        if alpha / n < c.min_alpha_words_ratio:
            return "gopher_quality:alpha_words_ratio", f"{alpha / n:.2f}"
        stops = sum(w.lower() in STOP_WORDS for w in words)
        if stops < c.min_stop_words:
            return "gopher_quality:stop_words", f"{stops} < {c.min_stop_words}"
        return None


class C4Config(FilterConfig):
    remove_lines_without_terminal_punct: bool = Field(True)
    min_words_per_line: int = Field(3, ge=0, description="Remove lines with fewer words.")
    remove_javascript_lines: bool = Field(True, description="Remove lines mentioning javascript.")
    remove_policy_lines: bool = Field(True, description="Remove cookie / privacy / terms-of-use notice lines.")
    drop_lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    drop_curly_bracket: bool = Field(False, description="Drop documents containing '{' (C4 did; hurts code-ish prose).")
    min_sentences: int = Field(3, ge=0, description="Drop documents with fewer sentences after line removal.")


_TERMINAL = (".", "?", "!", '"', "'", "”", "’", "。", "！", "？", "»", ":", ")")
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
    "accept cookies",
    "all rights reserved",
)
_SENTENCE_END = re.compile(r"[.!?。！？]+(?:\s|$)")


class C4Filter:
    name = "c4"

    def __init__(self, cfg: C4Config):
        self.cfg = cfg

    def check_and_edit(self, doc: Doc) -> tuple[Verdict, int]:
        c = self.cfg
        lower = doc.text.lower()
        if c.drop_lorem_ipsum and "lorem ipsum" in lower:
            return ("c4:lorem_ipsum", "contains 'lorem ipsum'"), 0
        if c.drop_curly_bracket and "{" in doc.text:
            return ("c4:curly_bracket", "contains '{'"), 0
        kept, removed = [], 0
        for line in doc.lines:
            s = line.strip()
            if not s:
                kept.append(line)
                continue
            low = s.lower()
            if (
                (c.remove_lines_without_terminal_punct and not s.endswith(_TERMINAL))
                or len(s.split()) < c.min_words_per_line
                or (c.remove_javascript_lines and "javascript" in low)
                or (c.remove_policy_lines and any(p in low for p in _POLICY))
            ):
                removed += 1
                continue
            kept.append(line)
        if removed:
            doc.set_text(_BLANKS.sub("\n\n", "\n".join(kept)).strip())
        if not doc.text:
            return ("c4:no_lines_left", f"all {removed} lines removed by line rules"), removed
        sentences = len(_SENTENCE_END.findall(doc.text))
        if sentences < c.min_sentences:
            return ("c4:too_few_sentences", f"{sentences} < {c.min_sentences}"), removed
        return None, removed


class FineWebConfig(FilterConfig):
    min_line_punct_ratio: float = Field(0.12, ge=0, le=1, description="Min fraction of lines ending in punctuation.")
    max_short_line_ratio: float = Field(0.67, ge=0, le=1, description="Max fraction of lines of <= 30 characters.")
    short_line_chars: int = Field(30, ge=1)
    max_dup_line_char_ratio: float = Field(0.01, ge=0, le=1, description="Max fraction of chars in repeated lines.")
    max_newline_word_ratio: float = Field(0.3, ge=0, description="Max newlines per word (list-like pages).")


class FineWebFilter:
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig):
        self.cfg = cfg

    def check(self, doc: Doc) -> Verdict:
        c = self.cfg
        lines = [line.strip() for line in doc.lines if line.strip()]
        if not lines:
            return "fineweb:no_lines", "empty"
        punct = sum(line.endswith(_TERMINAL) for line in lines) / len(lines)
        if punct < c.min_line_punct_ratio:
            return "fineweb:line_punct_ratio", f"{punct:.2f}"
        short = sum(len(line) <= c.short_line_chars for line in lines) / len(lines)
        if short > c.max_short_line_ratio:
            return "fineweb:short_line_ratio", f"{short:.2f}"
        _n, chars = _dup_stats(lines)
        total = sum(len(line) for line in lines)
        if _frac(chars, total) > c.max_dup_line_char_ratio:
            return "fineweb:dup_line_char_ratio", f"{chars / total:.3f}"
        ratio = doc.text.count("\n") / max(1, len(doc.words))
        if ratio > c.max_newline_word_ratio:
            return "fineweb:newline_word_ratio", f"{ratio:.2f}"
        return None


# --------------------------------------------------------------------------------------------------
# code


class CodeConfig(FilterConfig):
    max_line_chars: int = Field(1000, ge=1, description="Drop files with a longer line (minified, data blobs).")
    max_mean_line_chars: float = Field(100.0, ge=1)
    min_alnum_frac: float = Field(0.25, ge=0, le=1, description="Min fraction of alphanumeric characters.")
    autogenerated_markers: list[str] = Field(
        ["auto-generated", "autogenerated", "automatically generated", "do not edit", "generated by"],
        description="Drop files whose first lines contain one of these (case-insensitive).",
    )
    marker_lines: int = Field(5, ge=1, description="How many leading lines to search for the markers.")


class CodeFilter:
    name = "code"

    def __init__(self, cfg: CodeConfig):
        self.cfg = cfg

    def check(self, doc: Doc) -> Verdict:
        c, lines = self.cfg, doc.lines
        head = "\n".join(lines[: c.marker_lines]).lower()
        for marker in c.autogenerated_markers:
            if marker.lower() in head:
                return "code:autogenerated", f"header contains {marker!r}"
        longest = max((len(line) for line in lines), default=0)
        if longest > c.max_line_chars:
            return "code:max_line_chars", f"{longest} > {c.max_line_chars}"
        mean = sum(len(line) for line in lines) / max(1, len(lines))
        if mean > c.max_mean_line_chars:
            return "code:mean_line_chars", f"{mean:.1f} > {c.max_mean_line_chars}"
        text = doc.text
        alnum = sum(ch.isalnum() for ch in text) / max(1, len(text))
        if alnum < c.min_alnum_frac:
            return "code:alnum_frac", f"{alnum:.2f} < {c.min_alnum_frac}"
        return None
