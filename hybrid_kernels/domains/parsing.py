"""Mixed text -> typed spans, with explicit fallback rules on top of fluxem's tokenizer.

fluxem's ``MultiDomainTokenizer`` proposes spans; these rules decide what stays a domain span:

1. Unknown domain (a fluxem type we do not encode) or a domain not in the allow-list -> text.
2. Ambiguous parse -> the highest-priority reading that the rules accept, else text:
   * an all-capital word without digits ("DNA", "NASA") tagged FORMULA is an acronym -> text;
   * a letter + one digit ("A4", "C5") tagged CHORD/PITCH is a paper size, a grid cell or a
     pitch -> pitch only when the sentence has a music word, else text;
   * a quantity whose unit fluxem does not know ("3 apples") is text (its number is still a number);
   * "3+4j" stays COMPLEX only when the imaginary unit follows a digit and ends the word
     (fluxem reads "3 + 4 in m" as the complex "3 + 4 i"); "3 + 4" (ARITHMETIC) becomes number, operator text, number, so
     each operand is its own span at its own position.
3. Bare numbers in text become ``number`` spans; a bare unit becomes a ``unit`` span only as the
   target of a conversion ("5 km in cm": the word after in/to/into, if fluxem knows the unit).
4. Encoding error -> text (applied by :func:`hybrid_kernels.domains.encoding.encode_spans`).

fluxem is imported lazily (``pip install "hybrid-kernels[domains]"``).
"""
import re
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional

__all__ = ["DomainSpan", "DOMAINS", "DomainParser", "merge_text"]

# Our domain names, in priority order (first wins when two readings are acceptable).
DOMAINS = ("quantity", "complex", "rational", "vector", "dna", "pitch", "formula", "unit", "number")

_FLUXEM_TO_OURS = {"QUANTITY": "quantity", "COMPLEX": "complex", "RATIONAL": "rational",
                   "VECTOR": "vector", "DNA": "dna", "PITCH": "pitch", "CHORD": "pitch",
                   "FORMULA": "formula", "UNIT": "unit", "ARITHMETIC": "arithmetic"}
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
_ARITH = re.compile(r"\s*(\d+\.?\d*)\s*([+\-*/])\s*(\d+\.?\d*)\s*")
_CONVERSION_TARGET = re.compile(r"\b(?:in|to|into)\s+([A-Za-z][A-Za-z0-9/^*]*)")
_COMPLEX = re.compile(r"-?\d+\.?\d*\s*[+-]\s*\d+\.?\d*[ij]")
_LETTER_DIGIT = re.compile(r"[A-Ga-g][#b]?\d")
_MUSIC_WORDS = re.compile(r"\b(note|notes|pitch|tune|tuning|hz|piano|sing|sung|play|played|octave|chord)\b",
                          re.IGNORECASE)


@dataclass
class DomainSpan:
    """A piece of the input: ``domain`` is "text" or one of :data:`DOMAINS`; ``start:end`` index
    the original string; ``metadata`` carries parsed fields (e.g. value and unit)."""
    text: str
    domain: str
    start: int
    end: int
    metadata: Dict = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        return self.domain == "text"


def merge_text(spans: Iterable[DomainSpan]) -> List[DomainSpan]:
    """Join neighbouring text pieces (after spans fell back to text)."""
    out: List[DomainSpan] = []
    for s in spans:
        if s.is_text and out and out[-1].is_text and out[-1].end == s.start:
            prev = out[-1]
            out[-1] = DomainSpan(prev.text + s.text, "text", prev.start, s.end)
        else:
            out.append(s)
    return out


class DomainParser:
    """``parser(text) -> List[DomainSpan]`` covering ``text`` left to right, no gaps.

    Args:
        allow: domains to keep (subset of :data:`DOMAINS`); default all.
    """

    def __init__(self, allow: Optional[Iterable[str]] = None):
        allow = DOMAINS if allow is None else tuple(allow)
        unknown = sorted(set(allow) - set(DOMAINS))
        if unknown:
            raise ValueError(f"allow has unknown domains {unknown}; expected a subset of {list(DOMAINS)}")
        self.allow: FrozenSet[str] = frozenset(allow)
        from fluxem.integration.tokenizer import MultiDomainTokenizer
        self._tokenizer = MultiDomainTokenizer()

    def __call__(self, text: str) -> List[DomainSpan]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        music = bool(_MUSIC_WORDS.search(text))
        spans: List[DomainSpan] = []
        for tok in self._tokenizer.tokenize(text):
            piece = DomainSpan(tok.text, _FLUXEM_TO_OURS.get(tok.domain.name, "text"),
                               tok.start, tok.end, dict(tok.metadata or {}))
            spans.extend(self._resolve(piece, music, text))
        for rule in (self._units, self._numbers):
            spans = [s for piece in merge_text(spans) for s in (rule(piece) if piece.is_text else [piece])]
        return merge_text(spans)

    def _resolve(self, s: DomainSpan, music: bool, whole: str) -> List[DomainSpan]:
        text_piece = [DomainSpan(s.text, "text", s.start, s.end)]
        if s.domain == "complex" and not (_COMPLEX.fullmatch(s.text) and not whole[s.end:s.end + 1].isalnum()):
            return text_piece
        if s.domain == "arithmetic":
            return self._split_arithmetic(s)
        if s.domain == "formula" and s.text.isalpha() and s.text.isupper():
            return text_piece
        if s.domain == "quantity" and not _known_unit(s.metadata.get("unit", "")):
            return text_piece
        if s.domain == "pitch":
            if not (_LETTER_DIGIT.fullmatch(s.text) and music):
                return text_piece
        if s.domain not in self.allow:
            return text_piece
        return [s]

    def _split_arithmetic(self, s: DomainSpan) -> List[DomainSpan]:
        m = _ARITH.fullmatch(s.text)
        if m is None or "number" not in self.allow:
            return [DomainSpan(s.text, "text", s.start, s.end)]
        out = [DomainSpan(s.text[:m.start(1)], "text", s.start, s.start + m.start(1))]
        out.append(DomainSpan(m.group(1), "number", s.start + m.start(1), s.start + m.end(1)))
        out.append(DomainSpan(s.text[m.end(1):m.start(3)], "text", s.start + m.end(1), s.start + m.start(3)))
        out.append(DomainSpan(m.group(3), "number", s.start + m.start(3), s.start + m.end(3)))
        out.append(DomainSpan(s.text[m.end(3):], "text", s.start + m.end(3), s.end))
        return [p for p in out if p.text]

    def _numbers(self, s: DomainSpan) -> List[DomainSpan]:
        if "number" not in self.allow:
            return [s]
        return _cut(s, [(m.start(), m.end()) for m in _NUMBER.finditer(s.text)], "number")

    def _units(self, s: DomainSpan) -> List[DomainSpan]:
        if "unit" not in self.allow:
            return [s]
        found = [(m.start(1), m.end(1)) for m in _CONVERSION_TARGET.finditer(s.text) if _known_unit(m.group(1))]
        return _cut(s, found, "unit")


def _known_unit(unit: str) -> bool:
    from fluxem.domains.physics.units import parse_unit
    try:
        parse_unit(unit)
    except ValueError:
        return False
    return True


def _cut(s: DomainSpan, pieces, domain: str) -> List[DomainSpan]:
    """Split text span ``s`` at the (start, end) offsets ``pieces``, which become ``domain`` spans."""
    out, pos = [], 0
    for a, b in pieces:
        out.append(DomainSpan(s.text[pos:a], "text", s.start + pos, s.start + a))
        out.append(DomainSpan(s.text[a:b], domain, s.start + a, s.start + b))
        pos = b
    out.append(DomainSpan(s.text[pos:], "text", s.start + pos, s.end))
    return [p for p in out if p.text]
