"""Datasets: MVTec AD, MTD (DifferNet split) and the synthetic embedded default."""
from .datasets import AnomalyDataset, Sample, mtd, mvtec
from .synthetic import SyntheticDataset
from .transforms import ImageTransform

__all__ = ["AnomalyDataset", "ImageTransform", "Sample", "SyntheticDataset", "mtd", "mvtec"]
