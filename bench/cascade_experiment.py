"""Teacher-student cascade on the generated QA task: train a teacher FiD reader, distill a small
student from it, calibrate the student's confidence on a dev set, then report on held-out
questions the accuracy, the share the student answers and the time saved at 3 thresholds.

    PYTHONPATH=. python bench/cascade_experiment.py [--teacher-seconds 90 --student-seconds 60]
        [--save-dir DIR]     # DIR/teacher, DIR/student: for hybrid-kernels serve --model/--student
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_fid import batches, evaluate, fid_loss  # noqa: E402

from hybrid_kernels.cascade import Cascade, distillation_loss  # noqa: E402
from hybrid_kernels.rag import save_tokenizer  # noqa: E402
from hybrid_kernels.service.loading import CALIBRATION_NAME, tiny_reader  # noqa: E402
from hybrid_kernels.training import QATask, TrainConfig, Trainer, exact_match  # noqa: E402

def teacher_sizes(width: int) -> dict:
    return dict(d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_decoder_layers=2,
                num_heads=4)



STUDENT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4)


def train(model, loss_fn, data, seconds, steps, lr):
    cfg = TrainConfig(lr=lr, warmup_steps=50, max_steps=steps, max_seconds=seconds,
                      log_every=100, progress=True)
    trainer = Trainer(model, loss_fn, cfg)
    t0 = time.perf_counter()
    trainer.train(data)
    model.eval()
    return trainer.step, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=3, help="k passages per question (all read)")
    ap.add_argument("--hard-negatives", type=float, default=0.0,
                    help="share of other-person distractors that state the asked relation")
    ap.add_argument("--teacher-width", type=int, default=64, help="teacher d_model (2 + 2 layers)")
    ap.add_argument("--teacher-seconds", type=float, default=90)
    ap.add_argument("--student-seconds", type=float, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--thresholds", default=None, help="comma-separated (default: calibrate picks "
                    "the dev confidences' quartiles)")
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = QATask(num_passages=args.passages, hard_negatives=args.hard_negatives)
    k = args.passages
    teacher = tiny_reader(task.tokenizer, 0, **teacher_sizes(args.teacher_width)).train()
    t_steps, t_sec = train(teacher, fid_loss, batches(task, k, args.batch_size, 1, ramp_steps=300),
                           args.teacher_seconds, 100_000, 3e-3)
    print(f"teacher: {t_steps} steps in {t_sec:.0f} s, exact match {evaluate(teacher, task, k, 200):.3f}")

    student = tiny_reader(task.tokenizer, 1, **STUDENT).train()

    def distill(model, batch):
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])["logits"]
        s_logits = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])["logits"]
        return distillation_loss(s_logits, t_logits, batch["labels"])

    s_steps, s_sec = train(student, distill, batches(task, k, args.batch_size, 2, ramp_steps=300),
                           args.student_seconds, 100_000, 3e-3)
    print(f"student: {s_steps} steps in {s_sec:.0f} s, exact match {evaluate(student, task, k, 200):.3f}")

    def tensors(split, count, seed):
        exs = task.examples(count, split, seed=seed)
        b = task.batch(exs, k, random.Random(seed), with_labels=False)
        return b["input_ids"], b["attention_mask"], [ex.answer for ex in exs]

    cascade = Cascade(student, teacher, task.tokenizer)
    dev = tensors("valid", args.dev, 11)
    rows = cascade.calibrate(*dev, thresholds=args.thresholds and [float(x) for x in args.thresholds.split(",")],
                             max_new_tokens=4)
    thresholds = [r["threshold"] for r in rows]
    print(f"calibrated on {args.dev} dev questions: Platt (a, b) = {cascade.platt.tolist()}, "
          f"chosen threshold {cascade.threshold}")

    ids, mask, answers = tensors("test", args.test, 12)
    one = [(ids[i:i + 1], mask[i:i + 1]) for i in range(len(answers))]     # served one at a time

    def per_question(fn):
        t0 = time.perf_counter()
        predictions = [fn(i, m) for i, m in one]
        seconds = time.perf_counter() - t0
        return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers), seconds

    decode = lambda out: task.tokenizer.decode(out[0, 1:].tolist())  # noqa: E731
    teacher_acc, teacher_s = per_question(lambda i, m: decode(teacher.generate(i, m, max_new_tokens=4)))
    student_acc, student_s = per_question(lambda i, m: decode(student.generate(i, m, max_new_tokens=4)))
    print(f"\n{args.test} test questions answered one at a time, k={k} passages "
          f"(hard negatives {args.hard_negatives}), "
          f"{args.threads} thread(s) on {_cpu()} (shared machine)")
    print(f"teacher alone: accuracy {teacher_acc:.3f}, {teacher_s:.2f} s;  "
          f"student alone: accuracy {student_acc:.3f}, {student_s:.2f} s")
    print(f"{'threshold':>9} {'accuracy':>8} {'student share':>13} {'seconds':>8} {'time saved':>10}")
    for th in thresholds:
        routed = []

        def answer(i, m):
            r = cascade.answer(i, m, max_new_tokens=4, threshold=th)[0]
            routed.append(r.answered_by == "student")
            return r.answer

        acc, sec = per_question(answer)
        share = sum(routed) / len(routed)
        print(f"{th:>9.2f} {acc:>8.3f} {share:>13.3f} {sec:>8.2f} {100 * (1 - sec / teacher_s):>9.1f}%")
    if args.save_dir:
        for name, model in (("teacher", teacher), ("student", student)):
            path = os.path.join(args.save_dir, name)
            model.save_pretrained(path)
            save_tokenizer(task.tokenizer, path)
        cascade.save_calibration(os.path.join(args.save_dir, "student", CALIBRATION_NAME))
        print(f"saved {args.save_dir}/teacher and {args.save_dir}/student (with {CALIBRATION_NAME})")
    return 0


def _cpu() -> str:
    from hybrid_kernels.bench.env import device_name
    return device_name("cpu")


if __name__ == "__main__":
    raise SystemExit(main())
