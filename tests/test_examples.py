"""The runnable programs in python/ work as users will run them (small settings)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "python" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_quickstart():
    out = run("quickstart.py", "--n", "1024")
    assert "hk.attention [cpu]" in out, out
    err = float(out.strip().splitlines()[-1].split("=")[-1])
    assert err < 1e-4, out


def test_streaming_demo():
    out = run("streaming_demo.py", "--tokens", "600")
    assert "bit" in out.lower() and "KiB" in out, out


def test_fid_qa_end_to_end_with_a_random_reader():
    out = run("fid_qa.py", "--questions", "3", "--embedder", "hashing")
    assert "gold passage in top-10: 100.0%" in out, out


@pytest.mark.parametrize("zoo", [False, True])
@pytest.mark.parametrize("decode", [None, "dynamic", "static"], ids=["prefill", "decode", "decode-static"])
def test_models_on_kernels_quick(zoo, decode):
    out = run("models_on_kernels.py", "--quick", *(["--zoo"] if zoo else []),
              *(["--decode", "--cache", decode] if decode else []))
    names = (["llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3", "cohere2", "gpt_oss",
              "modernbert", "bert", "t5_encoder"] if zoo else ["mistral", "modernbert"])
    if decode:  # generation steps: the decoders only
        names = [n for n in names if n not in ("modernbert", "bert", "t5_encoder")]
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert [r[0] for r in rows] == names, out
    for r in rows:
        assert float(r[-1]) < 1e-4, out  # max relative difference to the default attention
