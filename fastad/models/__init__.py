"""Anomaly-detection models following one contract (:mod:`fastad.models.base`), registered by name."""
from .adpretrain import ADPretrain
from .base import MODELS, AnomalyModel, AnomalyOutput, create_model, load_checkpoint
from .dinomaly import Dinomaly
from .featurenorm import FeatureNorm
from .fod import FOD
from .minimaxad import MiniMaxAD
from .padim import PaDiM
from .patchcore import PatchCore
from .rlr import RLR
from .training import TrainedModel

__all__ = ["ADPretrain", "FOD", "MODELS", "RLR", "AnomalyModel", "AnomalyOutput", "Dinomaly", "FeatureNorm", "MiniMaxAD",
           "PaDiM", "PatchCore", "TrainedModel", "create_model", "load_checkpoint"]
