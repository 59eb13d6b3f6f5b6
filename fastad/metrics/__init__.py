"""Evaluation metrics: image and pixel AUROC, AP, F1-max, pixel AUPRO, all from one sort per level;
functions, and streaming (torchmetrics-style) classes of the same numbers; the thresholds and
normalisation a fitted model keeps to label new images (calibration)."""
from .aupro import aupro, aupro_reference, label_regions
from .calibration import calibrate, normalise
from .ranking import RankedScores, auroc, average_precision, f1_max
from .report import METRICS, compute_metrics
from .streaming import AUPRO, AUROC, AnomalyMetrics, AveragePrecision, F1Max

__all__ = [
    "AUPRO",
    "AUROC",
    "AnomalyMetrics",
    "AveragePrecision",
    "F1Max",
    "METRICS",
    "RankedScores",
    "aupro",
    "aupro_reference",
    "auroc",
    "average_precision",
    "calibrate",
    "compute_metrics",
    "f1_max",
    "label_regions",
    "normalise",
]
