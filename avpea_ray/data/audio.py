"""Audio front end: 16 kHz mono waveform -> T log-mel (kaldi fbank) windows, normalised.

Preprocessing done once, by the sharders (sharding/*.py), whose output (`fbank.npy`) the model
reads. The spectrogram of each window is an image of shape (time, mel) that the frozen ViT's own
patch embedding cuts into 16x16 patches (see `DualStreamViT.embed_audio`). The recipe is the
one the AV-PEA peers use (LAVISH, github.com/GenjiB/LAVISH): waveform mean removed, kaldi fbank
with a Hanning window, 128 mel bins and a 10 ms shift, padded or cropped to a fixed number of
frames, then `(x - mean) / (2 * std)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class AudioConfig:
    """How a clip's audio becomes T spectrogram windows.

    Args:
        window_seconds: length of the audio window paired with each frame (MUSIC-AVQA 1.95 s,
            AVE 1.0 s).
        target_frames: fbank frames per window after padding/cropping (AVQA 192, AVE 102).
        num_mel_bins: mel bins (the spectrogram's width).
        mean, std: dataset statistics for normalisation (AVE ViT statistics by default).
    """

    window_seconds: float = 1.95
    target_frames: int = 192
    num_mel_bins: int = 128
    mean: float = -4.1426
    std: float = 3.2001


def window_starts(num_samples: int, window_samples: int, num_windows: int) -> np.ndarray:
    """Start sample of each of `num_windows` windows spread evenly over a waveform.

    For a 10 s clip with 1 s windows and 10 windows this gives 0, 1 s, ..., 9 s (AVE's
    one window per second); for a 60 s clip it spaces the windows like the frames.
    """
    last_start = max(num_samples - window_samples, 0)
    return np.linspace(0, last_start, num_windows).round().astype(np.int64)


def fbank_window(waveform: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """One window's normalised log-mel spectrogram.

    Args:
        waveform: 1-D float tensor at 16 kHz.
        cfg: the front end's settings.

    Returns:
        `(cfg.target_frames, cfg.num_mel_bins)` float32 tensor.
    """
    min_samples = int(0.025 * SAMPLE_RATE)  # one 25 ms kaldi frame
    if waveform.numel() < min_samples:
        waveform = torch.nn.functional.pad(waveform, (0, min_samples - waveform.numel()))
    waveform = waveform - waveform.mean()
    fbank = kaldi.fbank(
        waveform.unsqueeze(0),
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.num_mel_bins,
        dither=0.0,
        frame_shift=10,
    )
    missing = cfg.target_frames - fbank.shape[0]
    if missing > 0:
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, missing))
    else:
        fbank = fbank[: cfg.target_frames]
    return (fbank - cfg.mean) / (cfg.std * 2)


def waveform_to_windows(waveform: np.ndarray | torch.Tensor, num_windows: int,
                        cfg: AudioConfig) -> torch.Tensor:
    """Cut a clip's waveform into `num_windows` evenly spaced windows and fbank each.

    Args:
        waveform: 1-D mono waveform at 16 kHz (any float dtype; int16 is rescaled).
        num_windows: T, one window per frame.
        cfg: the front end's settings.

    Returns:
        `(T, 1, cfg.target_frames, cfg.num_mel_bins)` float32 tensor, ready for
        `DualStreamViT.forward_features` after flattening the clip and time axes.
    """
    wav = torch.as_tensor(np.asarray(waveform))
    if wav.dtype == torch.int16:
        wav = wav.float() / 32768.0
    wav = wav.float()
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {tuple(wav.shape)}")
    window = int(round(cfg.window_seconds * SAMPLE_RATE))
    windows = [fbank_window(wav[start:start + window], cfg)
               for start in window_starts(wav.numel(), window, num_windows)]
    return torch.stack(windows).unsqueeze(1)
