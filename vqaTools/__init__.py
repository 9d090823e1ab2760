"""VQA v2 annotation API and the official VQA accuracy metric."""

from vqaTools.vqa import VQA
from vqaTools.vqa_eval import VQAEval, normalize_answer, vqa_accuracy

__all__ = ["VQA", "VQAEval", "normalize_answer", "vqa_accuracy"]
