"""fastad: fast unsupervised industrial image anomaly detection."""
from . import ops
from .models import PaDiM, PatchCore, create_model

__version__ = "0.1.0"
__all__ = ["PaDiM", "PatchCore", "create_model", "ops"]
