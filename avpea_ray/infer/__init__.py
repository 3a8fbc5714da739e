"""Using trained adapters: `predict` on videos as users have them, and batch inference over a
split's shards or a list of videos on Ray Data (`infer`)."""
from .predict import Media, format_table, predict
from .predictor import MediaError, Predictor

__all__ = ["Media", "MediaError", "Predictor", "format_table", "predict"]
