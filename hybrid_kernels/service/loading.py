"""Build the service's models from a :class:`ServiceConfig`: saved checkpoints, or small default
ones the package builds offline in a second (random weights over the generated QA task's
vocabulary: they serve well-formed answers at once; train them with the cascade / diffusion
experiments under bench/ and pass the directories for useful ones)."""
from __future__ import annotations

import os

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
