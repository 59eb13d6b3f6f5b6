"""fastad ops: each public op has a pure-PyTorch reference beside it (``<op>_reference``)."""
from .coreset import greedy_coreset, greedy_coreset_reference
from .feature_bank import FeatureBank
from .nearest import nearest_reference, nearest_reference_reference
from .smoothing import gaussian_blur

__all__ = [
    "FeatureBank",
    "gaussian_blur",
    "greedy_coreset",
    "greedy_coreset_reference",
    "nearest_reference",
    "nearest_reference_reference",
]
