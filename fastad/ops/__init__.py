"""fastad ops: each public op has a pure-PyTorch reference beside it (``<op>_reference``); one file per
op family; :mod:`fastad.ops.dispatch` picks the implementation (extension, Triton or PyTorch)."""
from . import dispatch
from .grid_attention import (
    local_window_attention,
    local_window_attention_reference,
    neighbour_masked_attention,
    neighbour_masked_attention_reference,
    window_mask,
)
from .linear_attention import linear_attention, linear_attention_reference
from .coreset import greedy_coreset, greedy_coreset_reference
from .feature_bank import FeatureBank, knn_rescore, knn_rescore_reference
from .hard_mining import adc_loss, adc_loss_reference, hard_mining_cosine_loss, hard_mining_cosine_loss_reference
from .nearest import nearest_reference, nearest_reference_reference
from .select import quantile, quantile_reference, select_rank, select_rank_reference
from .smoothing import gaussian_blur, gaussian_blur_small

__all__ = [
    "FeatureBank",
    "adc_loss",
    "dispatch",
    "adc_loss_reference",
    "gaussian_blur",
    "gaussian_blur_small",
    "greedy_coreset",
    "greedy_coreset_reference",
    "hard_mining_cosine_loss",
    "hard_mining_cosine_loss_reference",
    "linear_attention",
    "linear_attention_reference",
    "local_window_attention",
    "local_window_attention_reference",
    "nearest_reference",
    "neighbour_masked_attention",
    "neighbour_masked_attention_reference",
    "nearest_reference_reference",
    "knn_rescore",
    "knn_rescore_reference",
    "quantile",
    "quantile_reference",
    "select_rank",
    "select_rank_reference",
    "window_mask",
]
