"""fastad: fast unsupervised industrial image anomaly detection."""
from . import ops
from .models import Dinomaly, MiniMaxAD, PaDiM, PatchCore, create_model, load_checkpoint

__version__ = "0.1.0"
__all__ = ["Dinomaly", "MiniMaxAD", "PaDiM", "PatchCore", "create_model", "load_checkpoint", "ops"]
