"""Anomaly-detection models as plain nn.Modules, and a registry by name."""
from .padim import PaDiM
from .patchcore import PatchCore

MODELS = {"patchcore": PatchCore, "padim": PaDiM}


def create_model(name: str, **kwargs):
    """Instantiate a registered model with the paper defaults, overridden by ``kwargs``."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None
    return cls(**kwargs)


__all__ = ["MODELS", "PaDiM", "PatchCore", "create_model"]
