"""Build the service's models from a :class:`ServiceConfig`: saved checkpoints, or small default
ones the package builds offline. The default reader is either trained on the generated QA task
on first use (900 steps, 2-3 minutes on one core, then cached) or random weights (instant,
meaningless answers: for tests); the default student and diffusion model are random weights (train them with
the experiments under bench/ and pass their directories)."""
from __future__ import annotations

import os
import random
import sys

import torch

from .config import ServiceConfig

CALIBRATION_NAME = "cascade_calibration.json"   # next to a student checkpoint
DEFAULT_READER = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4)
DEFAULT_STUDENT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4)


def tiny_reader(tokenizer, seed: int, **sizes):
    """A random-init FiDT5 over ``tokenizer``'s vocabulary (pad 0, eos 1, decoder start 0)."""
    from transformers import T5Config

    from ..models.fid import FiDT5
    cfg = T5Config(vocab_size=len(tokenizer), dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8, **sizes)
    torch.manual_seed(seed)
    return FiDT5.from_config(cfg).eval()


def default_cache_dir() -> str:
    return os.environ.get("HYBRID_KERNELS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hybrid_kernels")


def trained_default_reader(directory: str, steps: int = 900, max_seconds: float = 300.0,
                           passages: int = 4):
    """(FiDT5, tokenizer) of the default reader trained for ``steps`` (at most ``max_seconds``)
    on the generated QA task, reading all ``passages`` of each question; saved to and reused
    from ``directory``."""
    from ..rag import save_tokenizer
    from ..training import QATask, TrainConfig, Trainer
    if os.path.exists(os.path.join(directory, "word_tokenizer.json")):
        return load_reader(directory)
    print(f"training the default reader ({steps} steps, 2-3 minutes; once, cached in {directory})",
          file=sys.stderr, flush=True)
    task = QATask(num_passages=passages)
    model = tiny_reader(task.tokenizer, 0, **DEFAULT_READER).train()
    rng = random.Random(0)

    def batches(ramp_steps: int = 300):
        # curriculum: first read the gold passage plus a growing number of others, then all
        step = 0
        while True:
            n = min(passages, 1 + (passages - 1) * step // ramp_steps)
            yield task.batch([task.example(rng) for _ in range(16)], n, rng, include_gold=True)
            step += 1

    loss = lambda m, b: m(b["input_ids"], b["attention_mask"], labels=b["labels"])["loss"]  # noqa: E731
    Trainer(model, loss, TrainConfig(lr=3e-3, max_steps=steps, max_seconds=max_seconds,
                                     progress=False)).train(batches())
    tmp = directory + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    save_tokenizer(task.tokenizer, tmp)
    os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
    os.replace(tmp, directory)          # a half-written cache is never picked up
    return model.eval(), task.tokenizer


def _checkpoint_dir(path: str) -> str:
    """Accept a checkpoint directory or a saved pipeline (its ``model/`` subdirectory)."""
    if not os.path.isdir(path):
        raise ValueError(f"model directory {path!r} does not exist")
    sub = os.path.join(path, "model")
    return sub if os.path.isdir(sub) else path


def load_reader(path: str):
    """(FiDT5, tokenizer) saved under ``path``."""
    from ..models.fid import FiDT5
    from ..rag import load_tokenizer
    path = _checkpoint_dir(path)
    return FiDT5.from_pretrained(path).eval(), load_tokenizer(path)


def _embedder(name: str):
    from ..retrieval.embedder import HashingEmbedder, TextEmbedder
    return TextEmbedder() if name == "minilm" else HashingEmbedder()


def build_engine(config: ServiceConfig):
    from ..cascade import Cascade
    from ..rag import HybridRAGPipeline
    from ..training.qa_task import QATask
    from .engine import Engine
    from .store import DocumentStore
    if config.model_dir:
        model, tokenizer = load_reader(config.model_dir)
    elif config.default_reader == "trained":
        model, tokenizer = trained_default_reader(os.path.join(config.cache_dir or default_cache_dir(),
                                                               "serve-default-reader"))
    else:
        tokenizer = QATask().tokenizer
        model = tiny_reader(tokenizer, config.seed, **DEFAULT_READER)
    if config.student_dir:
        student, _ = load_reader(config.student_dir)
    else:
        student = tiny_reader(tokenizer, config.seed + 1, **DEFAULT_STUDENT)
    if student.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"student vocab_size {student.config.vocab_size} != reader vocab_size "
                         f"{model.config.vocab_size}: the cascade needs one tokenizer")
    pipe = HybridRAGPipeline(model, tokenizer, embedder=_embedder(config.embedder),
                             chunk_words=config.chunk_words, chunk_overlap=min(20, config.chunk_words // 5))
    cascade = Cascade(student, model, tokenizer, threshold=config.threshold)
    calibration = os.path.join(_checkpoint_dir(config.student_dir), CALIBRATION_NAME) if config.student_dir else None
    if calibration and os.path.exists(calibration) and config.threshold_from_calibration:
        cascade.load_calibration(calibration)
    return Engine(pipe, DocumentStore(config.db_path), cascade)


def build_diffusion(config: ServiceConfig):
    from ..diffusion.text import MaskedDiffusionLM
    if config.diffusion_dir:
        return MaskedDiffusionLM.from_pretrained(config.diffusion_dir)
    return MaskedDiffusionLM.default(seed=config.seed)
