"""Smoke run of bench/domains_experiments.py on a tiny config: data, both models, scoring, files."""
import importlib.util
import json
import os

import pytest

pytest.importorskip("fluxem")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("domains_experiments",
                                                  os.path.join(ROOT, "bench", "domains_experiments.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["arithmetic", "units"])
def test_experiment_runs_end_to_end(tmp_path, name):
    mod = _load()
    with open(os.path.join(mod.CONFIG_DIR, f"{name}.json")) as f:
        cfg = json.load(f)
    cfg.update(train_size=64, eval_size=20, steps={"token_only": 2, "hybrid": 2}, batch_size=16)
    cfg["model"].update(hidden_size=16, num_layers=1, intermediate_size=32)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    (res,) = mod.main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert set(res["models"]) == set(mod.MODELS)
    for r in res["models"].values():
        assert r["steps"] == 2 and set(r["exact_match"]) == {"test_id", "test_ood"}
        assert all(0.0 <= v <= 1.0 for v in r["exact_match"].values())
    # every training answer is reproduced by one of the algebraic readouts (the hybrid's targets)
    assert res["models"]["hybrid"]["train_examples_without_readout"] == 0
    assert (tmp_path / "out" / f"{name}.json").exists() and (tmp_path / "out" / f"{name}.png").exists()


def test_splits_are_disjoint_in_the_way_the_experiment_claims():
    mod = _load()
    with open(os.path.join(mod.CONFIG_DIR, "units.json")) as f:
        units = json.load(f)
    splits = mod.make_splits(dict(units, train_size=300, eval_size=100))
    held = {tuple(p) for p in units["ood_pairs"]}
    pair = lambda text: (text.split()[1], text.split()[3])   # noqa: E731
    assert all(pair(t) not in held for t, _ in splits["train"] + splits["test_id"])
    assert all(pair(t) in held for t, _ in splits["test_ood"])
    with open(os.path.join(mod.CONFIG_DIR, "arithmetic.json")) as f:
        arith = json.load(f)
    splits = mod.make_splits(dict(arith, train_size=300, eval_size=100))
    longest = max(len(t.split()[0]) for t, _ in splits["train"])
    assert longest == 4 and all(max(len(t.split()[0]), len(t.split()[2])) > 2 for t, _ in splits["test_ood"])
