"""Training loops: multi-frequency CMS training and its update schedule."""

from .continuum_trainer import ContinuumMemoryTrainer, update_schedule, visualize_update_schedule

__all__ = ["ContinuumMemoryTrainer", "update_schedule", "visualize_update_schedule"]
