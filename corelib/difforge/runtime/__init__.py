"""The pipeline runtime: assembly from plugin names, recipes, the shared denoising loop."""

from .pipeline import Pipeline, current_cfg_branch

__all__ = ["Pipeline", "current_cfg_branch"]
