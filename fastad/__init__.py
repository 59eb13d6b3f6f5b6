"""fastad: fast unsupervised industrial image anomaly detection."""
from . import ops
from .models import FOD, RLR, ADPretrain, AnomalyModel, AnomalyOutput, Dinomaly, FeatureNorm, MiniMaxAD, PaDiM, PatchCore, create_model, load_checkpoint

__version__ = "0.4.0"
__all__ = ["ADPretrain", "FOD", "RLR", "AnomalyModel", "AnomalyOutput", "Dinomaly", "FeatureNorm", "MiniMaxAD", "PaDiM", "PatchCore",
           "create_model", "load_checkpoint", "ops"]
