"""Evaluation metrics shared by the tasks: retrieval recall@K, classification accuracy."""

from metrics.classification import accuracy, confusion_counts
from metrics.retrieval import ranks_of_targets, recall_at_k

__all__ = ["accuracy", "confusion_counts", "ranks_of_targets", "recall_at_k"]
