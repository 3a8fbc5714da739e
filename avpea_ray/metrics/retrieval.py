"""Text <-> audio-visual retrieval metrics: recall at k, median and mean rank, both directions.

Conventions (those of VALOR, CLIP4Clip and most video-text retrieval code):

- `similarity[i, j]` scores caption i against video j; a video may have several captions,
  `caption_to_video[i]` names caption i's own video.
- Text -> video: each caption queries all videos; its rank is the 1-based position of its own
  video.
- Video -> text: each video queries all captions; its rank is the best (smallest) rank among
  its own captions, i.e. a video counts as found at k when any one of its captions is in the
  top k.
- Ties are counted pessimistically: a rank is the number of candidates scoring at least as
  high as the correct one (the correct one included). A collapsed model that gives every pair
  the same score therefore gets the worst rank everywhere instead of R@1 = 100; optimistic or
  index-order tie breaking would make such a model look perfect (or depend on data order).
  For video -> text, where several captions are correct, ties are broken against the wrong
  captions only: the rank is 1 + the number of *other videos'* captions scoring at least as
  high as the video's best own caption (own captions tied with it are correct answers too, so
  a video with duplicate captions is not penalised). With one caption per video this is the
  same count as above; a constant matrix gives the worst possible rank, C - k + 1 for a video
  with k of the C captions.
"""
from __future__ import annotations

from typing import Any

import numpy as np

RECALL_AT = (1, 5, 10)


def _as_array(x: Any, name: str) -> np.ndarray:
    """numpy view of a numpy array, torch tensor or nested sequence (torch is not imported)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu()
        if hasattr(x, "is_floating_point") and x.is_floating_point():
            x = x.double()  # also covers bfloat16, which numpy cannot hold; exact for all floats
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected an array or tensor, got {type(x).__name__}") from err


def rank_of_targets(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based pessimistic rank of each row's target column.

    Args:
        scores: (n, m) real scores; row i ranks the m candidates of query i.
        targets: (n,) column of each row's correct candidate.

    Returns:
        (n,) int64: for each row, how many candidates score >= the target's score.
    """
    correct = scores[np.arange(scores.shape[0]), targets]
    return (scores >= correct[:, None]).sum(axis=1).astype(np.int64)


def _summary(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    out[f"{prefix}_MedR"] = float(np.median(ranks))
    out[f"{prefix}_MeanR"] = float(np.mean(ranks))
    return out


def retrieval_metrics(similarity: Any, caption_to_video: Any) -> dict[str, float]:
    """Recall@{1,5,10} (percent), median and mean rank for text->video and video->text.

    Args:
        similarity: (num_captions, num_videos) real scores, numpy array or torch tensor (any
            device); higher means more similar. NaN is rejected.
        caption_to_video: (num_captions,) integer index of each caption's own video; every
            video needs at least one caption.

    Returns:
        {"t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MedR", "t2v_MeanR",
         "v2t_R@1", "v2t_R@5", "v2t_R@10", "v2t_MedR", "v2t_MeanR"} -> float. Recalls are in
        percent; ranks are 1-based (a median may end in .5).

    Raises:
        ValueError: wrong shapes or dtypes, NaN scores, an index out of range, or a video
            without any caption.
    """
    sim = _as_array(similarity, "similarity")
    c2v = _as_array(caption_to_video, "caption_to_video")
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(
            f"similarity: expected a non-empty 2-D (num_captions, num_videos) array, got shape {sim.shape}"
        )
    real = np.issubdtype(sim.dtype, np.floating) or np.issubdtype(sim.dtype, np.integer)
    if sim.dtype == np.bool_ or not real:
        raise ValueError(f"similarity: expected real (float or integer) scores, got dtype {sim.dtype}")
    if np.issubdtype(sim.dtype, np.floating) and np.isnan(sim).any():
        raise ValueError(f"similarity: {int(np.isnan(sim).sum())} NaN scores (a diverged model?)")
    num_captions, num_videos = sim.shape
    if c2v.shape != (num_captions,):
        raise ValueError(
            f"caption_to_video: expected shape ({num_captions},) to match similarity, got {c2v.shape}"
        )
    if c2v.dtype == np.bool_ or not np.issubdtype(c2v.dtype, np.integer):
        raise ValueError(f"caption_to_video: expected integer video indices, got dtype {c2v.dtype}")
    c2v = c2v.astype(np.int64)
    if c2v.min() < 0 or c2v.max() >= num_videos:
        raise ValueError(
            f"caption_to_video: indices must lie in [0, {num_videos}), got [{c2v.min()}, {c2v.max()}]"
        )
    captions_per_video = np.bincount(c2v, minlength=num_videos)
    if (captions_per_video == 0).any():
        lonely = np.flatnonzero(captions_per_video == 0)
        raise ValueError(
            f"{len(lonely)} of {num_videos} videos have no caption (e.g. {lonely[:5].tolist()}); "
            "video->text ranks need at least one caption per video"
        )

    t2v = rank_of_targets(sim, c2v)

    # A video's rank over all captions is that of its best own caption (ranks only grow as
    # the score drops): 1 + the wrong captions scoring at least the best own score, i.e. all
    # captions at or above it minus the own captions tied with it.
    own = sim[np.arange(num_captions), c2v].astype(np.float64)
    best_own = np.full(num_videos, -np.inf)
    np.maximum.at(best_own, c2v, own)
    at_or_above = (sim >= best_own[None, :]).sum(axis=0)
    own_at_best = np.bincount(c2v, weights=own >= best_own[c2v], minlength=num_videos).astype(np.int64)
    v2t = (at_or_above - own_at_best + 1).astype(np.int64)

    return {**_summary("t2v", t2v), **_summary("v2t", v2t)}
