"""Meta-learning of learned optimizers: MetaLearner, pretrain_optimizer and task generators."""

from .meta_training import (
    MetaLearner,
    SinusoidTask,
    create_regression_tasks,
    create_sinusoid_tasks,
    pretrain_optimizer,
)

__all__ = ["MetaLearner", "SinusoidTask", "create_regression_tasks", "create_sinusoid_tasks", "pretrain_optimizer"]
