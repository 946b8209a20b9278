"""Typed spans: fluxem parsing under the fallback rules, and the algebraic identities of the
encodings as the pipeline produces them (before any learned projection)."""
import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fluxem")

from hybrid_kernels.domains import DomainParser, MixedStreamBatcher, SpanEncoder, encode_spans  # noqa: E402
from hybrid_kernels.domains.encoding import (LINEAR_SCALE, NUMBER_LINEAR, NUMBER_LOG,  # noqa: E402
                                             QUANTITY_LOG, UNIT_LOG, decode_linear, decode_log)


@pytest.fixture(scope="module")
def parse():
    parser, encoder = DomainParser(), SpanEncoder()
    return lambda text: [(s.domain, s.text) for s in encode_spans(parser(text), encoder)]


TRICKY = [
    # fluxem tags "DNA" as a FORMULA: an all-capital word without digits is an acronym
    ("DNA is ATGCCGTAGCAA", [("text", "DNA is "), ("dna", "ATGCCGTAGCAA")]),
    ("NASA and NaCl", [("text", "NASA and "), ("formula", "NaCl")]),
    # "A4" is a paper size unless the sentence is about music
    ("print it on A4 paper", [("text", "print it on A4 paper")]),
    ("sing the A4 note", [("text", "sing the "), ("pitch", "A4"), ("text", " note")]),
    # complex number vs arithmetic: operands of arithmetic become their own spans
    ("3+4j", [("complex", "3+4j")]),
    ("3 + 4", [("number", "3"), ("text", " + "), ("number", "4")]),
    ("3 + 4 in m", [("number", "3"), ("text", " + "), ("number", "4"), ("text", " in "), ("unit", "m")]),
    ("Water (H2O) boils at 373.15 K",
     [("text", "Water ("), ("formula", "H2O"), ("text", ") boils at "), ("quantity", "373.15 K")]),
    ("5 km in cm", [("quantity", "5 km"), ("text", " in "), ("unit", "cm")]),
    ("walk in the park", [("text", "walk in the park")]),
    # fluxem knows no unit "apples": not a quantity, the number stays a number
    ("I have 3 apples", [("text", "I have "), ("number", "3"), ("text", " apples")]),
    ("play C#5 now", [("text", "play "), ("pitch", "C#5"), ("text", " now")]),
    # encoding error (the value overflows to inf) -> text
    ("it is 1e999 km away", [("text", "it is 1e999 km away")]),
    ("v = [1, 2, 3]", [("text", "v = "), ("vector", "[1, 2, 3]")]),
]


@pytest.mark.parametrize("text,expected", TRICKY, ids=[t for t, _ in TRICKY])
def test_fallback_rules_on_tricky_strings(parse, text, expected):
    spans = parse(text)
    assert spans == expected
    assert "".join(t for _, t in spans) == text       # spans cover the text, in order


def test_allow_list_and_unknown_domains_become_text():
    parser = DomainParser(allow=["number"])
    assert [(s.domain, s.text) for s in parser("H2O at 12 K")] == [("text", "H2O at "), ("number", "12"),
                                                                    ("text", " K")]
    # a date is a fluxem domain we do not encode: with numbers disallowed it stays text
    assert [s.domain for s in DomainParser(allow=["formula"])("on 2024-01-15 we met")] == ["text"]
    assert [s.domain for s in DomainParser(allow=["formula"])("x^2 + 2x + 1")] == ["text"]


def test_parser_rejects_bad_arguments():
    with pytest.raises(ValueError, match="allow has unknown domains.*'chords'"):
        DomainParser(allow=["number", "chords"])
    with pytest.raises(TypeError, match="text must be a str; got int"):
        DomainParser()(42)


def _span_vectors(text):
    batcher = MixedStreamBatcher(lambda s: [1] * len(s), ["number", "quantity", "unit"])
    batch = batcher([text])
    return batch.encodings[0, batch.domain_mask[0]].numpy()


@pytest.mark.parametrize("a,b", [(7, 5), (1234, 98765), (31415926, 27182818), (0, 42)])
def test_sum_and_product_identities_through_the_pipeline(a, b):
    ea, eb = _span_vectors(f"{a} + {b}")
    (es,), (ep,) = _span_vectors(f"= {a + b} ="), _span_vectors(f"= {a * b} =")
    assert ea[NUMBER_LINEAR] + eb[NUMBER_LINEAR] == pytest.approx(es[NUMBER_LINEAR], rel=1e-12)
    assert round(decode_linear(ea + eb)) == a + b
    if a and b:    # log encodings: products -> sums
        assert ea[NUMBER_LOG] + eb[NUMBER_LOG] == pytest.approx(ep[NUMBER_LOG], rel=1e-12)
        if a * b < 10 ** 12:     # exp(log a + log b) in float64 is exact to the integer up to ~1e12
            assert round(decode_log(ea + eb)) == a * b
        assert decode_log(ea + eb) == pytest.approx(a * b, rel=1e-12)
    assert es[NUMBER_LINEAR] * LINEAR_SCALE == pytest.approx(a + b)


def test_quantity_and_unit_identities_through_the_pipeline():
    q, u = _span_vectors("5 km in cm")
    assert q[QUANTITY_LOG] == pytest.approx(math.log(5000.0), rel=1e-12)        # SI value
    assert u[UNIT_LOG] == pytest.approx(math.log(0.01), rel=1e-12)
    assert round(math.exp(q[QUANTITY_LOG] - u[UNIT_LOG])) == 500000
    (speed,), (metre,), (second,) = (_span_vectors(f"1 m in {x}")[1:] for x in ("m/s", "m", "s"))
    dims = slice(8, 15)      # SI exponents: units multiply -> exponents add
    np.testing.assert_allclose(speed[dims], metre[dims] - second[dims])
    (km,), (m,) = _span_vectors("1 m in km")[1:], _span_vectors("1 m in m")[1:]
    assert km[UNIT_LOG] - m[UNIT_LOG] == pytest.approx(math.log(1000.0), rel=1e-12)


def test_core_package_does_not_need_fluxem():
    code = ("import sys; sys.modules['fluxem'] = None; import hybrid_kernels, hybrid_kernels.domains\n"
            "try:\n    hybrid_kernels.domains.DomainParser()\nexcept ImportError:\n    print('lazy')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"
