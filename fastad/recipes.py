"""Per-method recipes: the arguments each authors' script uses for a (dataset, setting), as data.

``fastad run`` applies the recipe of its (model, data kind, setting) before the user's ``--set``
arguments (which win) and records it at the top of ``results.md`` and in every ``results.json``
row. A (model, data, setting) without a row runs the model's defaults (the papers' defaults for
MVTec AD), and says so. Each row names the script it was read from; the model arguments themselves
are documented on the model classes.
"""
from __future__ import annotations

__all__ = ["RECIPES", "recipe_for"]

# one row per (model, data kinds, setting): the arguments that differ per dataset or setting, and where
# they come from. "setting" is fastad run's: separate (one model per class) or unified (multi-class);
# "pretrain" rows are fastad pretrain's.
RECIPES: list[dict] = [
    {"model": "dinomaly", "data": ("mvtec", "visa", "mpdd"), "setting": "separate",
     "args": {"iterations": 5000, "optimizer_eps": 1e-8},
     "source": "Dinomaly dinomaly_{mvtec,visa,mpdd}_sep.py: total_iters 5000, StableAdamW eps 1e-8"},
    {"model": "dinomaly", "data": ("realiad",), "setting": "separate",
     "args": {"iterations": 5000, "optimizer_eps": 1e-10},
     "source": "Dinomaly dinomaly_realiad_sep.py: total_iters 5000, eps 1e-10, dropout 0.2"},
    {"model": "dinomaly", "data": ("mvtec", "visa"), "setting": "unified",
     "args": {"iterations": 10000, "optimizer_eps": 1e-10},
     "source": "Dinomaly dinomaly_{mvtec,visa}_uni.py: total_iters 10000, eps 1e-10"},
    {"model": "dinomaly", "data": ("realiad",), "setting": "unified",
     "args": {"iterations": 50000, "optimizer_eps": 1e-10, "dropout": 0.4},
     "source": "Dinomaly dinomaly_realiad_uni.py: total_iters 50000, eps 1e-10, bMlp drop 0.4"},
    {"model": "minimaxad", "data": ("mvtec", "visa"), "setting": "unified",
     "args": {"loss": "fr", "epochs": 160},
     "source": "MiniMaxAD train_multi_{MVTecAD,ViSA}.py: ADCLoss, 160 epochs"},
    {"model": "minimaxad", "data": ("visa",), "setting": "separate",
     "args": {"loss": "fp", "epochs": 150},
     "source": "MiniMaxAD train_single_ViSA.py: global cosine loss, 150 epochs"},
    {"model": "minimaxad", "data": ("realiad",), "setting": "unified",
     "args": {"loss": "fr", "epochs": 1},
     "source": "MiniMaxAD train_multi_RealIAD.py: ADCLoss, 1 epoch"},
    {"model": "minimaxad", "data": ("realiad",), "setting": "separate",
     "args": {"loss": "fr", "epochs": 50},
     "source": "MiniMaxAD train_single_RealIAD.py: ADCLoss, 50 epochs"},
    {"model": "fod", "data": ("mvtec", "btad"), "setting": "separate",
     "args": {"epochs": 100, "train_batch_size": 1, "adam_semantics": "torch1.13"},
     "source": "FOD main.py/trainer.py: 100 epochs, batch 1, one Adam stepped per level under torch 1.13 "
               "(zero_grad keeps zero gradients: momentum-only steps of the other level)"},
    {"model": "rlr", "data": ("mvtec", "visa"), "setting": "unified",
     "args": {"epochs": 200, "train_batch_size": 4},
     "source": "RLR README: 200 epochs, batch 4 (spec 2)"},
    {"model": "patchcore", "data": ("mvtec", "mpdd", "btad", "visa"), "setting": "separate",
     "args": {"coreset_ratio": 0.1, "num_neighbors": 1},
     "source": "PatchCore sample_runs: 10% approximate greedy coreset, k = 1"},
    {"model": "adpretrain", "data": ("realiad",), "setting": "pretrain",
     "args": {"epochs": 10, "train_batch_size": 32, "view_normalisation": "clip", "same_view_references": True},
     "source": "ADPretrain main.py: 10 epochs of 32, MoCoTransform views normalised with CLIP statistics, "
               "references of the same class and camera view"},
    {"model": "featurenorm", "data": ("mvtec", "visa", "btad", "mpdd"), "setting": "separate",
     "args": {"shots": 8},
     "source": "ADPretrain val_norm.py: 8-shot references (TOTAL_SHOT 8)"},
]


def recipe_for(model: str, kind: str, setting: str) -> dict | None:
    """The recipe row of (registered model name, data kind, setting), or None: the model's defaults."""
    for row in RECIPES:
        if row["model"] == model and kind in row["data"] and row["setting"] == setting:
            return row
    return None
