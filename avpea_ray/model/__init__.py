"""The AV-PEA model: adapter, dual-stream frozen ViT trunk, and the model that takes a head."""
from .adapter import AVPEA
from .adapter_io import load_adapters, save_adapters
from .backbone import WeightsError, create_backbone
from .config import ModelConfig
from .dual_stream import DualStreamViT
from .task_model import AVPEAModel

__all__ = ["AVPEA", "AVPEAModel", "DualStreamViT", "ModelConfig", "WeightsError", "create_backbone",
           "load_adapters", "save_adapters"]
