"""Hyperparameter sweeps of AV-PEA training: Ray Tune over Ray Train V2 with ASHA early
stopping, one MLflow parent run per sweep and a nested child run per trial.

    from avpea_ray.tune import load_sweep_config, run_sweep
    cfg, sweep = load_sweep_config("configs/sweep_avqa_vit_b16.yaml")
    summary = run_sweep(cfg, sweep)
"""
from .config import SchedulerConfig, SweepConfig, load_sweep_config
from .plan import prepare_sweep
from .sweep import run_sweep

__all__ = ["SchedulerConfig", "SweepConfig", "load_sweep_config", "prepare_sweep", "run_sweep"]
