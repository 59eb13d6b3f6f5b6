"""Evaluation metrics (the full set lands with the evaluation issue)."""
from .auroc import auroc

__all__ = ["auroc"]
