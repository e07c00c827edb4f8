"""Training loops: multi-frequency CMS training and its update schedule."""

from .continuum_trainer import ContinuumMemoryTrainer, update_schedule, visualize_update_schedule
from .nested_trainer import NestedLearningTrainer, create_nested_learning_setup

__all__ = [
    "ContinuumMemoryTrainer",
    "NestedLearningTrainer",
    "create_nested_learning_setup",
    "update_schedule",
    "visualize_update_schedule",
]
