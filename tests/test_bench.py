"""The benchmark harness on tiny sizes: output schema, the correctness gate, pair counting."""
import csv
import importlib.util
import itertools
import json
import os

import pytest
import torch

from hybrid_kernels.bench import (BenchOptions, Case, Provider, get_providers, parse_pattern,
                                  register_provider, run_benchmark, unregister_provider,
                                  visible_pairs)
from hybrid_kernels.bench.cases import landmark_positions, make_inputs
from hybrid_kernels.bench.check import expected_result
from hybrid_kernels.bench.flex import FlexProvider
from hybrid_kernels.bench.report import COLUMNS
from hybrid_kernels.bench.runner import prepare
from hybrid_kernels.bench.timing import TimingConfig, measure
from hybrid_kernels.reference import visibility_mask

TINY = TimingConfig(warmup=1, min_repeats=2, max_repeats=3, target_seconds=0.0)


class ScaledSdpa(Provider):
    """Deliberately wrong: SDPA output times 1.05."""
    name = "fake-wrong"

    def build(self, case, q, k, v):
        f = torch.nn.functional.scaled_dot_product_attention
        return lambda: f(q, k, v) * 1.05


class Raising(Provider):
    name = "fake-raises"

    def build(self, case, q, k, v):
        def run():
            raise RuntimeError("kernel exploded")
        return run


class CountingWrong(Provider):
    """Wrong output; counts calls so the test can see it was not timed."""
    name = "fake-counting"

    def __init__(self):
        self.calls = 0

    def build(self, case, q, k, v):
        def run():
            self.calls += 1
            return torch.zeros_like(q)
        return run


@pytest.fixture(autouse=True)
def restore_threads():
    """run_benchmark fixes the thread count process-wide; give the next tests theirs back."""
    env = os.environ.get("HYBRID_KERNELS_NUM_THREADS")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("HYBRID_KERNELS_NUM_THREADS", None)
    else:
        os.environ["HYBRID_KERNELS_NUM_THREADS"] = env


@pytest.fixture
def fake_providers():
    counting = CountingWrong()
    for p in (ScaledSdpa(), Raising(), counting):
        register_provider(p)
    yield counting
    for name in ("fake-wrong", "fake-raises", "fake-counting"):
        unregister_provider(name)


def test_visible_pairs_matches_mask():
    for nq, nk, left, right, causal, g in itertools.product(
            [1, 97, 130], [97, 130], [-1, 0, 7, 300], [-1, 0, 5], [False, True], [0, 1, 9]):
        lm = landmark_positions(nk, g)
        mask = visibility_mask(1, nq, nk, window_left=left, window_right=right, causal=causal,
                               landmarks=None if lm is None else lm[None],
                               key_padding_mask=None)
        assert visible_pairs(nq, nk, left, right, causal, lm) == int(mask.sum())


def test_parse_pattern():
    p = parse_pattern("int8")
    assert (p.window, p.num_landmarks, p.quant, p.causal) == ((256, 256), 16, "int8", False)
    p = parse_pattern("causal+window", window=(8, 0), num_landmarks=3)
    assert (p.window, p.num_landmarks, p.causal) == ((8, 0), 0, True)
    with pytest.raises(ValueError, match="unknown pattern"):
        parse_pattern("sliding")


def test_wrong_provider_is_flagged_not_timed(tmp_path, fake_providers):
    opts = BenchOptions(patterns=["window+landmarks", "causal+window"], sizes=[96], dtypes=["fp32"],
                        modes=["fwd", "bwd"], heads=2, head_dim=16, window=(8, 8), landmarks=3,
                        providers=["hk-cpu", "sdpa", "reference", "fake-wrong", "fake-raises",
                                   "fake-counting"],
                        device="cpu", threads=1, timing=TINY, out_dir=str(tmp_path),
                        prefix="t", progress=False)
    out = run_benchmark(opts, echo=lambda *a: None)
    by = {(r.case.pattern.name, r.case.mode, r.provider): r for r in out.results}
    for pattern, mode in itertools.product(["window+landmarks", "causal+window"], ["fwd", "bwd"]):
        for name in ("sdpa", "reference"):
            r = by[(pattern, mode, name)]
            assert r.status == "ok", (pattern, mode, name, r.reason)
            assert r.ms_median > 0 and r.ms_p20 <= r.ms_median <= r.ms_p80 and r.repeats >= 2
            assert r.max_abs_err < 1e-3 and r.gflops > 0
        assert by[(pattern, mode, "sdpa")].speedup_vs_sdpa == pytest.approx(1.0)
        wrong = by[(pattern, mode, "fake-wrong")]
        assert wrong.status == "WRONG" and "rel L1" in wrong.reason  # (grads are scaled too)
        assert wrong.ms_median is None and wrong.repeats == 0
        raised = by[(pattern, mode, "fake-raises")]
        assert raised.status == "ERROR" and "kernel exploded" in raised.reason
        assert raised.ms_median is None
        hk = by[(pattern, mode, "hk-cpu")]
        assert hk.status in ("ok", "SKIP")
        if hk.status == "SKIP":
            assert hk.reason and not hk.available
    # the counting provider ran once per case (its check) and never in a timing loop
    assert fake_providers.calls == 4
    assert by[("causal+window", "fwd", "fake-counting")].status == "WRONG"

    csv_path, json_path, png_path = (out.paths[k] for k in ("csv", "json", "png"))
    assert os.path.basename(csv_path) == "t.csv"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == COLUMNS
    assert len(rows) == len(out.results) == 2 * 2 * 6
    ok_rows = [r for r in rows if r["status"] == "ok"]
    assert ok_rows and all(float(r["ms_median"]) > 0 for r in ok_rows)
    for r in rows:
        assert r["device"] == "cpu" and r["threads"] == "1" and r["mode"] in ("fwd", "bwd")
        assert r["dtype"] == "fp32" and r["git_revision"] and r["timestamp"]
        assert json.loads(r["versions"])["torch"] == torch.__version__
    with open(json_path) as f:
        data = json.load(f)
    assert set(data) == {"environment", "results"}
    assert {"timestamp", "git_revision", "device_name", "threads", "versions"} <= set(data["environment"])
    assert [set(r) for r in data["results"]] == [set(COLUMNS)] * len(rows)
    assert sum(r["status"] == "WRONG" for r in data["results"]) >= 3
    if importlib.util.find_spec("matplotlib") is None:  # the [bench] extra brings it
        assert png_path is None
    else:
        with open(png_path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "WRONG" in out.text and "fake-raises" in out.text


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern", ["window+landmarks", "causal+window+landmarks", "causal",
                                     "window", "full"])
def test_flex_arrangement_matches_reference(pattern):
    """The landmark-in-front FlexAttention arrangement (run eagerly here) is exact."""
    case = Case(parse_pattern(pattern, window=(20, 5), num_landmarks=5), n=200, heads_q=2,
                heads_kv=2, head_dim=16)
    inputs = make_inputs(case)
    timed, result = prepare(FlexProvider(compiled=False), case, inputs,
                            expected_result(case, *inputs))
    assert result.status == "ok", result.reason
    assert result.max_abs_err < 1e-4


def test_skip_reasons():
    from hybrid_kernels.bench.providers import ReferenceProvider, SdpaProvider
    assert "SDPA" in ReferenceProvider().skip_reason(Case(parse_pattern("causal"), n=64))
    assert ReferenceProvider().skip_reason(Case(parse_pattern("window"), n=64)) is None
    case = Case(parse_pattern("window"), n=4096)
    assert "GiB" in SdpaProvider(max_mask_bytes=1 << 20).skip_reason(case)
    assert SdpaProvider(max_mask_bytes=1 << 20).skip_reason(Case(parse_pattern("full"), n=4096)) is None


def test_measure_statistics():
    stats = measure(lambda: sum(range(1000)), "cpu",
                    TimingConfig(warmup=1, min_repeats=7, max_repeats=7, target_seconds=0))
    assert stats.repeats == 7 and stats.p20 <= stats.median <= stats.p80


def test_default_providers_registered():
    names = [p.name for p in get_providers()]
    assert {"hk-cpu", "hk-triton", "hk-cuda", "sdpa", "flex", "reference"} <= set(names)


def test_cpu_report_ratios_from_results():
    """The report's ratios are computed from the measured medians as the targets state."""
    from hybrid_kernels.bench.cpu_report import CpuReport, format_report, report_case, ratio_rows
    from hybrid_kernels.bench.runner import Result
    n = 4096
    fp32 = report_case(n)

    def res(provider, ms, case=fp32):
        return Result(case, provider, "ok", ms_median=ms, ms_p20=ms, ms_p80=ms, max_abs_err=0.0)
    rep = CpuReport(mm_fp32=100.0, mm_bf16=400.0, results=[
        res("hk-cpu", 10.0), res("flex", 20.0), res("sdpa", 50.0), res("reference", 40.0),
        res("hk-cpu", 4.0, report_case(n, torch.bfloat16)),
        res("hk-cpu", 5.0, report_case(n, quant=True)),
        res("hk-cpu", 2.0, report_case(n, torch.bfloat16, quant=True)),
        res("hk-cpu", 25.0, report_case(n, mode="bwd")),
        res("hk-cpu", 16.0, report_case(n, torch.bfloat16, mode="bwd"))],
        memory={n: {"peak_bytes": 100 << 20, "qkv_bytes": 24 << 20, "io_bytes": 32 << 20}})
    rows = {what.split(" (")[0]: (value, met) for what, value, _, met in ratio_rows(rep, n)}
    gf = 4 * fp32.pairs() * 64 * 8 / (10.0 * 1e6)
    assert rows["hk fp32 fwd GF/s / torch.mm fp32 GF/s"][0] == pytest.approx(gf / 100.0)
    assert rows["hk fp32 fwd speedup vs flex"] == (pytest.approx(2.0), True)
    assert rows["hk fp32 fwd speedup vs best pure torch"] == (pytest.approx(4.0), True)
    assert rows["hk bf16 fwd speedup vs hk fp32 fwd"] == (pytest.approx(2.5), True)
    assert rows["hk int8 fwd speedup vs hk fp32 fwd"] == (pytest.approx(2.0), True)
    assert rows["hk fp32 bwd time / fwd time"] == (pytest.approx(2.5), True)
    assert rows["hk bf16 bwd time / bf16 fwd time"] == (pytest.approx(4.0), False)
    assert rows["hk bf16 fwd GF/s / torch.mm bf16 GF/s"][0] == pytest.approx(gf * 2.5 / 400.0)
    assert rows["hk int8 fwd speedup vs hk bf16 fwd, bf16 inputs"] == (pytest.approx(2.0), True)
    text = format_report(rep, [n], 2)
    assert "peak memory / (q+k+v+out)" in text and "NOT met" in text  # (24+100)/32 > 2


def test_cpu_report_ratios_prefer_the_round_robin():
    """With a round-robin (rep.paired) the hk-vs-hk and hk-vs-mm ratios come from it; flex and
    pure torch still from the table. paired_medians times every function each round."""
    from hybrid_kernels.bench.cpu_report import (CpuReport, format_report, report_case,
                                                 paired_medians, ratio_rows)
    from hybrid_kernels.bench.runner import Result
    n = 4096
    fp32 = report_case(n)
    rep = CpuReport(mm_fp32=1.0, results=[
        Result(fp32, "hk-cpu", "ok", ms_median=99.0, ms_p20=99.0, ms_p80=99.0, max_abs_err=0.0),
        Result(fp32, "flex", "ok", ms_median=30.0, ms_p20=30.0, ms_p80=30.0, max_abs_err=0.0)])
    mm_ms = 2.0 * 4096 ** 3 / (200.0 * 1e6)  # 200 GF/s
    rep.paired[n] = {"fp32": 10.0, "bf16": 4.0, "int8": 5.0, "int8 bf16": 3.2, "bwd fp32": 25.0,
                     "bwd bf16": 12.0, "mm": mm_ms, "mm bf16": mm_ms / 4}
    rows = {what.split(" (")[0]: (value, met) for what, value, _, met in ratio_rows(rep, n)}
    gf = 4 * fp32.pairs() * 64 * 8 / (10.0 * 1e6)
    assert rows["hk fp32 fwd GF/s / torch.mm fp32 GF/s"][0] == pytest.approx(gf / 200.0)
    assert rows["hk fp32 fwd speedup vs flex"][0] == pytest.approx(30.0 / 99.0)
    assert rows["hk bf16 fwd speedup vs hk fp32 fwd"] == (pytest.approx(2.5), True)
    assert rows["hk int8 fwd speedup vs hk fp32 fwd"] == (pytest.approx(2.0), True)
    assert rows["hk fp32 bwd time / fwd time"] == (pytest.approx(2.5), True)
    assert rows["hk bf16 bwd time / bf16 fwd time"] == (pytest.approx(3.0), True)
    assert rows["hk bf16 fwd GF/s / torch.mm bf16 GF/s"][0] == pytest.approx(gf * 2.5 / 800.0)
    assert rows["hk int8 fwd speedup vs hk bf16 fwd, bf16 inputs"] == (pytest.approx(1.25), False)
    assert "round-robin" in format_report(rep, [n], 2)
    calls = []
    med = paired_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         rounds=3)
    assert calls == ["a", "a", "b", "b"] * 3 and set(med) == {"a", "b"}


def _load_bench_script(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_report_takes_layers_in_turn(capsys):
    """--layers L: every function gets L inputs and each call takes the next one; the table
    has one row per case with positive times."""
    report = _load_bench_script("decode_report.py")
    calls = []
    fn = report.in_turn(lambda x: calls.append(x), [(0,), (1,), (2,)])
    for _ in range(7):
        fn()
    assert calls == [0, 1, 2, 0, 1, 2, 0]

    assert report.main(["--nk", "16", "--rounds", "1", "--layers", "2", "--no-int8"]) == 0
    out = capsys.readouterr().out
    assert "layers: 2" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("fp32", "bf16"))]
    assert [r[:2] for r in rows] == [["fp32", "MHA"], ["fp32", "GQA"], ["bf16", "MHA"],
                                     ["bf16", "GQA"]]
    for r in rows:
        assert r[-7] == "16"
        sdpa_us, hk_us = float(r[-6]), float(r[-5])
        assert sdpa_us > 0 and hk_us > 0
    with pytest.raises(SystemExit):
        report.main(["--layers", "0"])
