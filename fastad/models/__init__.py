"""Anomaly-detection models as plain nn.Modules, and a registry by name."""
from .adpretrain import ADPretrain
from .dinomaly import Dinomaly
from .fod import FOD
from .minimaxad import MiniMaxAD
from .padim import PaDiM
from .patchcore import PatchCore
from .rlr import RLR

MODELS = {"patchcore": PatchCore, "padim": PaDiM, "dinomaly": Dinomaly, "minimaxad": MiniMaxAD, "rlr": RLR, "fod": FOD,
          "adpretrain": ADPretrain, "featurenorm": ADPretrain}  # FeatureNorm is ADPretrain's default scorer


def create_model(name: str, **kwargs):
    """Instantiate a registered model with the paper defaults, overridden by ``kwargs``."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None
    return cls(**kwargs)


def load_checkpoint(path, device="cpu", **overrides):
    """Rebuild a trained model (Dinomaly, MiniMaxAD, RLR, FOD, ADPretrain) from a fastad checkpoint: its stored
    constructor arguments, updated by ``overrides`` (e.g. ``weights='random'`` when the encoder
    file is absent: the checkpoint holds the encoder weights too), moved to ``device``, then its
    weights and training state."""
    from ._training import checkpoint_config

    name, config = checkpoint_config(path)
    cls = next((c for c in MODELS.values() if c.__name__ == name), None)
    if cls is None:
        raise ValueError(f"{path} holds a {name} checkpoint, not a registered model")
    return cls(**{**config, **overrides}).to(device).load_checkpoint(path)


__all__ = ["ADPretrain", "FOD", "MODELS", "RLR", "Dinomaly", "MiniMaxAD", "PaDiM", "PatchCore", "create_model", "load_checkpoint"]
