"""Smoke run of bench/train_fid.py --quick: trains, evaluates, times the decode path."""
import importlib.util
import os

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_fid_quick(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_fid", os.path.join(ROOT, "bench", "train_fid.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results, speed = mod.main(["--quick", "--quiet", "--steps", "12", "--passages", "1", "3",
                               "--eval-questions", "6", "--save-dir", str(tmp_path / "ckpt"),
                               "--json", str(tmp_path / "out.json")])
    assert [r["n_passages"] for r in results] == [1, 3]
    assert all(r["steps"] == 12 and 0.0 <= r["exact_match"] <= 1.0 for r in results)
    assert (tmp_path / "out.json").exists() and (tmp_path / "ckpt" / "word_tokenizer.json").exists()
    row = speed[0]
    assert row["int8_kv_MB"] < 0.4 * row["fp32_kv_MB"]  # int8 K + bf16 V: 3/8, plus scales
    assert row["int8_max_abs_err"] < 0.05
