"""The AV-PEA model: adapter, dual-stream frozen ViT trunk, audio front end, task model."""
from .adapter import AVPEA
from .adapter_io import load_adapters, load_model, save_adapters
from .audio import AudioConfig, waveform_to_windows
from .backbone import WeightsError, create_backbone
from .config import ModelConfig
from .dual_stream import DualStreamViT
from .task_model import AVPEAModel

__all__ = ["AVPEA", "AVPEAModel", "AudioConfig", "DualStreamViT", "ModelConfig", "WeightsError",
           "create_backbone", "load_adapters", "load_model", "save_adapters",
           "waveform_to_windows"]
