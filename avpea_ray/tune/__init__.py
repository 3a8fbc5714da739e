"""Hyperparameter sweeps of AV-PEA training: Ray Tune over Ray Train V2 with ASHA early
stopping, one MLflow parent run per sweep and a nested child run per trial.

    from avpea_ray.tune import load_sweep_config, run_sweep
    cfg, sweep = load_sweep_config("configs/sweep_avqa_vit_b16.yaml")
    summary = run_sweep(cfg, sweep)
"""
from .config import DEMO_SWEEP, SchedulerConfig, SweepConfig, load_sweep_config
from .sweep import prepare_sweep, run_sweep

__all__ = ["DEMO_SWEEP", "SchedulerConfig", "SweepConfig", "load_sweep_config", "prepare_sweep", "run_sweep"]
