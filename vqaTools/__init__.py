"""VQA v2 annotation API and the official VQA accuracy metric."""

from vqaTools.vqa import VQA
from vqaTools.vqa_eval import VQA_RULES, VQAEval, check_rules, normalize_answer, vqa_accuracy

__all__ = ["VQA", "VQAEval", "VQA_RULES", "check_rules", "normalize_answer", "vqa_accuracy"]
