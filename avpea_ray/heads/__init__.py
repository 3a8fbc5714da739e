"""Task heads, kept apart from the trunk: each takes the DualStreamViT token sequences."""
from avpea_ray.heads.avel import AVELHead, avel_accuracy, avel_counts, avel_predict
from avpea_ray.heads.avqa import (
    GROUPS,
    QUESTION_TYPES,
    AVQAHead,
    avqa_accuracies,
    avqa_counts,
    majority_accuracy,
    question_type_from_record,
)

__all__ = [
    "AVELHead",
    "AVQAHead",
    "GROUPS",
    "QUESTION_TYPES",
    "avel_accuracy",
    "avel_counts",
    "avel_predict",
    "avqa_accuracies",
    "avqa_counts",
    "majority_accuracy",
    "question_type_from_record",
]
