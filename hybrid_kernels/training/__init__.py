"""Training utilities: a small :class:`Trainer` and the generated multi-passage QA task."""
from .entity_qa import EntityQATask, EntityQuestion, EntityWorld
from .qa_task import QAExample, QATask, WordTokenizer, exact_match, normalize_answer
from .trainer import TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "QATask", "QAExample", "WordTokenizer", "exact_match",
           "normalize_answer", "EntityQATask", "EntityQuestion", "EntityWorld"]
