"""Task heads, kept apart from the trunk: each takes the DualStreamViT token sequences
(`(B, T, N+1, D)` visual, `(B, T, M+1, D)` audio) and is built for the trunk's width D."""
from .avc import AVCHead
from .avel import CompactAVELHead, avel_predict, build_avel_head
from .avqa import GROUPS, QUESTION_TYPES, AVQAHead, avqa_accuracies, avqa_counts
from .avr import AVRHead
from .cmbs import CMBSHead

__all__ = ["AVCHead", "AVQAHead", "AVRHead", "CMBSHead", "CompactAVELHead", "GROUPS", "QUESTION_TYPES",
           "avel_predict", "avqa_accuracies", "avqa_counts", "build_avel_head"]
