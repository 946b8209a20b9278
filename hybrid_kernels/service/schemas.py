"""Request/response models of the HTTP service, with the limits every request is validated against
(a violation is answered 422 naming the field)."""
from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_QUESTION_CHARS = 1000
MAX_TOP_K = 20
MAX_NEW_TOKENS = 64
MAX_DOCUMENT_CHARS = 20_000
MAX_TITLE_CHARS = 200
MAX_BATCH_DOCUMENTS = 64
MAX_BATCH_REMOVALS = 1000
MAX_CONDITION_CHARS = 200
MAX_DIFFUSION_SAMPLES = 16
MAX_DIFFUSION_STEPS = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryRequest(_Strict):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    max_new_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)

    @model_validator(mode="after")
    def _not_blank(self):
        if not self.question.strip():
            raise ValueError("question must contain a non-space character")
        return self


class Passage(BaseModel):
    id: int
    document_id: int
    title: str
    text: str
    score: float


class QueryResponse(BaseModel):
    question: str
    answer: str
    passages: List[Passage]
    timings: Dict[str, float]            # seconds per stage


class CascadeResponse(QueryResponse):
    answered_by: Literal["student", "teacher"]
    confidence: float
    threshold: float


class Document(_Strict):
    title: str = Field(default="", max_length=MAX_TITLE_CHARS)
    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS)


class RetentionUpdate(_Strict):
    add: List[Document] = Field(default_factory=list, max_length=MAX_BATCH_DOCUMENTS)
    remove_documents: List[int] = Field(default_factory=list, max_length=MAX_BATCH_REMOVALS)
    remove_segments: List[int] = Field(default_factory=list, max_length=MAX_BATCH_REMOVALS)

    @model_validator(mode="after")
    def _something_to_do(self):
        if not (self.add or self.remove_documents or self.remove_segments):
            raise ValueError("give at least one of add, remove_documents, remove_segments")
        return self


class RetentionResult(BaseModel):
    log_seq: int                          # position of this update in the retention log
    added_documents: List[int]
    added_segments: List[int]
    removed_documents: int
    removed_segments: int


class DiffusionRequest(_Strict):
    condition: str = Field(min_length=1, max_length=MAX_CONDITION_CHARS)
    num_samples: int = Field(default=1, ge=1, le=MAX_DIFFUSION_SAMPLES)
    num_steps: int = Field(default=8, ge=1, le=MAX_DIFFUSION_STEPS)
    seed: int = Field(default=0, ge=0, le=2 ** 31 - 1)


class DiffusionResponse(BaseModel):
    condition: str
    documents: List[str]


class Health(BaseModel):
    status: Literal["ok"]
    documents: int
    segments: int


class Stats(BaseModel):
    documents: int
    segments: int
    index_vectors: int
    index_bytes: int
    log_entries: int
    latency_ms: Dict[str, Dict[str, float]]   # endpoint -> {count, p50, p95, p99}
    memory: Dict[str, int]                    # bytes
    kernels: Dict[str, Optional[str]]
    workers: Dict[str, int]
