"""The console entry points, run as a user would (subprocess)."""
import importlib.util
import json
import os
import subprocess
import sys

import hybrid_kernels

# The child imports the same copy of the package as this process (installed or checkout).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(hybrid_kernels.__file__)))


def _run(*args, timeout=120):
    env = dict(os.environ,
               PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "hybrid_kernels", *args], cwd=PACKAGE_PARENT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_info():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "torch" in out and "backends" in out
    for backend in ("cpu", "reference", "triton", "cuda"):
        assert f"  {backend} " in out
    assert "reference  usable" in out
    # a backend that cannot run says why
    for line in out.splitlines():
        if "unusable" in line:
            assert len(line.split("unusable: ", 1)[1]) > 5, line
    assert "cpu:" in out and "gpu" in out and "features" in out


def test_bench_tiny(tmp_path):
    proc = _run("bench", "--patterns", "window+landmarks,causal", "--sizes", "64,128",
                "--providers", "hk-cpu,sdpa,reference", "--heads", "2", "--head-dim", "16",
                "--window", "8", "8", "--landmarks", "3", "--device", "cpu", "--threads", "1",
                "--repeats", "3", "--out-dir", str(tmp_path), "--prefix", "cli",
                "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "threads: 1" in out and "ms median [p20, p80]" in out and "GF/s" in out
    has_mpl = importlib.util.find_spec("matplotlib") is not None  # from the [bench] extra
    last = f"plot: {tmp_path / 'cli.png'}" if has_mpl else "plot: not written (pip install matplotlib)"
    assert out.rstrip().splitlines()[-1] == last
    for ext in ("csv", "json", "png") if has_mpl else ("csv", "json"):
        assert (tmp_path / f"cli.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "cli.json").read_text())
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"sdpa", "reference"}
    assert {r["n_k"] for r in ok} == {64, 128}


def test_bench_rejects_bad_pattern(tmp_path):
    proc = _run("bench", "--patterns", "diagonal", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "unknown pattern" in proc.stderr
    assert "Traceback" not in proc.stderr
