"""Datasets: MVTec AD (and MPDD), VisA, BTAD, Real-IAD, MTD (DifferNet split), a generic folder layout
and the synthetic embedded default."""
from .datasets import AnomalyDataset, Sample, btad, folder, mtd, mvtec, realiad, visa
from .synthetic import SyntheticDataset
from .transforms import ImageTransform

__all__ = ["AnomalyDataset", "ImageTransform", "Sample", "SyntheticDataset", "btad", "folder", "mtd", "mvtec", "realiad", "visa"]
