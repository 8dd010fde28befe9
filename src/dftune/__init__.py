"""dftune: Dynamic Fine-Tuning (DFT) and its family of probability-weighted objectives."""

from dftune.loss import LossResult, token_loss
from dftune.objective_spec import get_objective
from dftune.objectives import OBJECTIVES, Objective, TokenContext

__all__ = ["token_loss", "LossResult", "get_objective", "OBJECTIVES", "Objective", "TokenContext"]
__version__ = "0.1.0"
