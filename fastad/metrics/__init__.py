"""Evaluation metrics: image and pixel AUROC, AP, F1-max, pixel AUPRO, all from one sort per level."""
from .aupro import aupro, aupro_reference, label_regions
from .ranking import RankedScores, auroc, average_precision, f1_max
from .report import METRICS, compute_metrics

__all__ = [
    "METRICS",
    "RankedScores",
    "aupro",
    "aupro_reference",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1_max",
    "label_regions",
]
