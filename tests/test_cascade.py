"""Teacher-student cascade: confidence, routing, calibration, distillation loss."""
import random

import pytest
import torch

pytest.importorskip("transformers")

from hybrid_kernels.cascade import Cascade, answer_log_prob, distillation_loss, greedy_answers  # noqa: E402
from hybrid_kernels.service.loading import DEFAULT_READER, DEFAULT_STUDENT, tiny_reader  # noqa: E402
from hybrid_kernels.training import QATask  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    task = QATask(num_passages=3)
    exs = task.examples(12, "test")
    b = task.batch(exs, 3, random.Random(0), with_labels=False)
    student = tiny_reader(task.tokenizer, 1, **DEFAULT_STUDENT)
    teacher = tiny_reader(task.tokenizer, 0, **DEFAULT_READER)
    return task, exs, b, student, teacher


def test_answer_log_prob_matches_a_manual_sum(setup):
    task, _, b, student, _ = setup
    out = student.generate(b["input_ids"], b["attention_mask"], max_new_tokens=4)
    got = answer_log_prob(student, b["input_ids"], b["attention_mask"], out)
    with torch.no_grad():
        logits = student(b["input_ids"], b["attention_mask"], decoder_input_ids=out[:, :-1])["logits"]
    logp = torch.log_softmax(logits.float(), -1)
    for row in range(out.shape[0]):
        total, n = 0.0, 0
        for t, tok in enumerate(out[row, 1:].tolist()):
            total += float(logp[row, t, tok])
            n += 1
            if tok == 1:          # eos counts, then stop
                break
        assert got[row].item() == pytest.approx(total / n, abs=1e-4)


def test_one_pass_greedy_matches_generate_and_teacher_forced_scores(setup):
    task, _, b, student, _ = setup
    out = student.generate(b["input_ids"], b["attention_mask"], max_new_tokens=4)
    answers, mean_logp = greedy_answers(student, task.tokenizer, b["input_ids"], b["attention_mask"], 4)
    assert answers == [task.tokenizer.decode(o[1:].tolist()) for o in out]
    torch.testing.assert_close(mean_logp, answer_log_prob(student, b["input_ids"], b["attention_mask"], out),
                               atol=1e-4, rtol=1e-4)


def test_routing_follows_the_threshold(setup):
    task, _, b, student, teacher = setup
    cascade = Cascade(student, teacher, task.tokenizer)
    all_student = cascade.answer(b["input_ids"], b["attention_mask"], max_new_tokens=4, threshold=0.0)
    assert {r.answered_by for r in all_student} == {"student"}
    all_teacher = cascade.answer(b["input_ids"], b["attention_mask"], max_new_tokens=4, threshold=1.0)
    teacher_out = teacher.generate(b["input_ids"], b["attention_mask"], max_new_tokens=4)
    for r, o in zip(all_teacher, teacher_out):
        if r.answered_by == "teacher":
            assert r.answer == task.tokenizer.decode(o[1:].tolist())
        else:
            assert r.confidence >= 1.0
    mid = sorted(r.confidence for r in all_student)[len(all_student) // 2]
    routed = cascade.answer(b["input_ids"], b["attention_mask"], max_new_tokens=4, threshold=mid)
    assert [r.answered_by == "student" for r in routed] == [r.confidence >= mid for r in all_student]


def test_calibrate_returns_one_row_per_threshold_and_picks_one(setup):
    task, exs, b, student, teacher = setup
    cascade = Cascade(student, teacher, task.tokenizer)
    rows = cascade.calibrate(b["input_ids"], b["attention_mask"], [ex.answer for ex in exs],
                             thresholds=(0.2, 0.5, 0.9), max_new_tokens=4)
    assert [r["threshold"] for r in rows] == [0.2, 0.5, 0.9]
    assert all(0.0 <= r["student_share"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    shares = [r["student_share"] for r in rows]
    assert shares == sorted(shares, reverse=True)          # higher threshold, fewer student answers
    assert cascade.threshold in (0.2, 0.5, 0.9)
    assert cascade.platt is not None and torch.isfinite(cascade.platt).all()


def test_calibrate_rejects_mismatched_answers(setup):
    task, _, b, student, teacher = setup
    with pytest.raises(ValueError, match="answers"):
        Cascade(student, teacher, task.tokenizer).calibrate(b["input_ids"], b["attention_mask"], ["x"])


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        Cascade(None, None, None, threshold=1.5)


def test_distillation_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    same = distillation_loss(logits, logits, labels, alpha=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    assert distillation_loss(logits, torch.randn(2, 3, 7), labels, alpha=0.0).item() == pytest.approx(ce.item())
    assert distillation_loss(logits, torch.randn(2, 3, 7), labels, alpha=1.0).item() > 0
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(logits, logits[:, :2], labels)


def test_calibration_round_trip(setup, tmp_path):
    task, _, _, student, teacher = setup
    a = Cascade(student, teacher, task.tokenizer, threshold=0.7)
    a.platt = torch.tensor([2.0, -1.0])
    a.save_calibration(str(tmp_path / "c.json"))
    b = Cascade(student, teacher, task.tokenizer)
    b.load_calibration(str(tmp_path / "c.json"))
    assert b.threshold == 0.7 and b.platt.tolist() == [2.0, -1.0]
    (tmp_path / "bad.json").write_text('{"threshold": 3, "platt": null}')
    with pytest.raises(ValueError, match="threshold"):
        b.load_calibration(str(tmp_path / "bad.json"))
