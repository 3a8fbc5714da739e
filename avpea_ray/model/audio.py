"""Moved to `avpea_ray.data.audio`; this alias stays until model.config and bench/ import from there."""
from ..data.audio import AudioConfig, waveform_to_windows  # noqa: F401
