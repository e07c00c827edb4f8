"""Models: self-modifying layers, the self-modifying Titans mixer, HOPE and a Transformer baseline."""

from .hope import HOPE, MIXERS, HOPEBlock, HOPEForSequenceClassification, HOPEState, LinearAttentionWithMemory
from .titans import L2RegressionAttention, SelfModifyingAttention, SelfModifyingLinear, SelfModifyingTitan
from .titans_mixer import SelfModifyingTitansMixer
from .transformer import Transformer

__all__ = [
    "HOPE",
    "HOPEBlock",
    "HOPEForSequenceClassification",
    "HOPEState",
    "L2RegressionAttention",
    "LinearAttentionWithMemory",
    "MIXERS",
    "SelfModifyingAttention",
    "SelfModifyingLinear",
    "SelfModifyingTitan",
    "SelfModifyingTitansMixer",
    "Transformer",
]
