"""Datasets: MVTec AD (and MPDD), VisA, BTAD, Real-IAD, MTD (DifferNet split), the generic folder
layout, an ImageFolder-style layout, CSV/JSON list files and the synthetic embedded default."""
from .datasets import (AnomalyDataset, Sample, WithReferences, btad, folder, imagefolder, list_classes, listfile, mtd, mvtec,
                       read_references, realiad, visa)
from .synthetic import SyntheticDataset
from .transforms import ImageTransform

__all__ = ["AnomalyDataset", "ImageTransform", "Sample", "SyntheticDataset", "btad", "folder", "imagefolder", "list_classes",
           "listfile", "mtd", "mvtec", "read_references", "realiad", "visa", "WithReferences"]
