"""Explanation-aware training objectives: consistency reweighting (METHODS §5a) and SCAAT (§5b)."""

from xai_core.objectives.consistency import (
    ConsistencyResult,
    consistency_weights,
    degenerate_weights,
    explanation_consistency,
    normalise_weights,
    weighted_cross_entropy,
)
from xai_core.objectives.scaat import ScaatResult, scaat_loss

__all__ = ["ConsistencyResult", "ScaatResult", "consistency_weights", "degenerate_weights", "explanation_consistency",
           "normalise_weights", "scaat_loss", "weighted_cross_entropy"]
