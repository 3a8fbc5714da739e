"""The AV-PEA model: adapter, dual-stream frozen ViT trunk, task model.

The audio front end (fbank windows) is preprocessing: `avpea_ray.data.audio`.
"""
from .adapter import AVPEA
from .adapter_io import load_adapters, load_model, save_adapters
from .backbone import WeightsError, create_backbone
from .config import ModelConfig
from .dual_stream import DualStreamViT
from .task_model import AVPEAModel

__all__ = ["AVPEA", "AVPEAModel", "DualStreamViT", "ModelConfig", "WeightsError",
           "create_backbone", "load_adapters", "load_model", "save_adapters"]
