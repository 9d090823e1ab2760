"""Evaluation metrics shared by the tasks: retrieval recall@K, classification accuracy."""

from metrics.classification import accuracy, confusion_counts
from metrics.retrieval import albef_ranks, recall_at_k

__all__ = ["accuracy", "albef_ranks", "confusion_counts", "recall_at_k"]
