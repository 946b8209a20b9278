"""Typed span -> deterministic 128-d fluxem encoding (float64 numpy).

fluxem returns float32, which rounds the algebraic slots (x / 1e15 for an 8-digit x is off by
~1 unit); the slots below are rewritten in float64 from the parsed values, so sums of encodings
decode exactly to double precision.

Algebraic slots the experiments and tests rely on (fluxem's layout, offsets into the 128-d vector):
``number``: [8] sign, [9] log|x| / scale, [11] x / 1e15 (linear: enc(a) + enc(b) = enc(a + b) there);
``quantity``: SI value (value x unit factor) as [16] sign, [17] log|x|, SI exponents in [8:15];
``unit``: SI exponents in [8:15], [17] log of the factor to SI (products -> sums).
"""
import re
from typing import List

import numpy as np

from .parsing import DomainSpan, merge_text

__all__ = ["EMBEDDING_DIM", "NUMBER_LINEAR", "NUMBER_LOG", "LINEAR_SCALE", "QUANTITY_LOG", "UNIT_LOG",
           "SpanEncoder", "encode_spans", "decode_linear", "decode_log"]

EMBEDDING_DIM = 128
NUMBER_LINEAR = 11      # x / LINEAR_SCALE
NUMBER_LOG = 9          # log|x| (fluxem's log_encode_value)
LINEAR_SCALE = 1e15
QUANTITY_LOG = 17       # log|SI value|
UNIT_LOG = 17           # log|factor to SI|


class SpanEncoder:
    """``encoder(span) -> np.ndarray (128,)``; raises ValueError when fluxem cannot encode it."""

    def __init__(self):
        from fluxem.domains.biology import DNAEncoder
        from fluxem.domains.chemistry import MoleculeEncoder
        from fluxem.domains.math import ArithmeticEncoder, ComplexEncoder, RationalEncoder, VectorEncoder
        from fluxem.domains.music import PitchEncoder
        from fluxem.domains.physics.dimensions import DimensionalQuantity
        from fluxem.domains.physics.units import UnitEncoder, parse_unit
        self._parse_unit = parse_unit
        self._number, self._quantity, self._unit = ArithmeticEncoder(), DimensionalQuantity(), UnitEncoder()
        self._by_text = {"formula": MoleculeEncoder(), "dna": DNAEncoder(), "pitch": PitchEncoder()}
        self._complex, self._vector, self._rational = ComplexEncoder(), VectorEncoder(), RationalEncoder()

    def __call__(self, span: DomainSpan) -> np.ndarray:
        try:
            vec = np.asarray(self._encode(span), dtype=np.float64)
            for slot, value in self._exact_slots(span).items():
                vec[slot] = value
        except Exception as e:   # fluxem raises anything from ValueError to NameError
            raise ValueError(f"cannot encode {span.domain} span {span.text!r}: {e}") from e
        if vec.shape != (EMBEDDING_DIM,) or not np.isfinite(vec).all():
            raise ValueError(f"cannot encode {span.domain} span {span.text!r}: got shape {vec.shape}"
                             f" with finite={bool(np.isfinite(vec).all())}")
        return vec

    def number(self, value: float) -> np.ndarray:
        return self(DomainSpan(repr(value), "number", 0, 0))

    def _exact_slots(self, span: DomainSpan) -> dict:
        from fluxem.core.base import log_encode_value
        if span.domain == "number":
            x = float(span.text)
            return {NUMBER_LOG: log_encode_value(x)[1], NUMBER_LINEAR: x / LINEAR_SCALE}
        if span.domain == "quantity":
            unit = self._parse_unit(span.metadata["unit"])
            return {QUANTITY_LOG: log_encode_value(float(span.metadata["value"]) * unit.total_factor)[1]}
        if span.domain == "unit":
            return {UNIT_LOG: log_encode_value(self._parse_unit(span.text).total_factor)[1]}
        return {}

    def _encode(self, span: DomainSpan):
        d, text, meta = span.domain, span.text, span.metadata
        if d == "number":
            x = float(text)
            return self._number.encode(int(x) if x.is_integer() else x)
        if d == "quantity":
            unit = self._parse_unit(meta["unit"])
            return self._quantity.encode(float(meta["value"]) * unit.total_factor, unit.dimensions)
        if d == "unit":
            return self._unit.encode(text)
        if d == "complex":
            imag = -meta["imag"] if meta["sign"] == "-" else meta["imag"]
            return self._complex.encode(complex(meta["real"], imag))
        if d == "vector":
            return self._vector.encode([float(x) for x in re.findall(r"-?\d+\.?\d*", text)])
        if d == "rational":
            return self._rational.encode((meta["numerator"], meta["denominator"]))
        if d in self._by_text:
            return self._by_text[d].encode(text)
        raise ValueError(f"no encoder for domain {d!r}")


def encode_spans(spans: List[DomainSpan], encoder: SpanEncoder) -> List[DomainSpan]:
    """Attach ``metadata["encoding"]`` to every domain span; a span that fails to encode becomes
    text (the fallback rule), merged with its text neighbours."""
    out = []
    for s in spans:
        if s.is_text:
            out.append(s)
            continue
        try:
            out.append(DomainSpan(s.text, s.domain, s.start, s.end, {**s.metadata, "encoding": encoder(s)}))
        except ValueError:
            out.append(DomainSpan(s.text, "text", s.start, s.end))
    return merge_text(out)


def decode_linear(vec: np.ndarray) -> float:
    """Number from the linear slot (sums of number encodings decode to sums)."""
    return float(np.float64(vec[NUMBER_LINEAR]) * LINEAR_SCALE)


def decode_log(vec: np.ndarray, slot: int = NUMBER_LOG) -> float:
    """|x| from a log slot (sums of log slots decode to products)."""
    from fluxem.core.base import log_decode_value
    return abs(log_decode_value(1.0, float(vec[slot])))

