"""Reading the weight files the methods' authors release or their scripts write (``torch.save`` of a
state dict), renamed to fastad's modules. Each model states its key mapping as a list of
(authors' prefix, fastad prefix) pairs; a file whose keys do not all map, or that lacks any of the
module's keys, is refused with the keys named, never loaded in part."""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["load_authors_state", "read_torch_state"]


def read_torch_state(path, what: str, keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file (``weights_only``: no code runs), read once: the file's
    state dict, or with ``keys`` those entries' state dicts, their keys prefixed ``<entry>.``.
    Raises FileNotFoundError / ValueError naming the file and what was expected (``what``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled code weights_only refuses
        raise ValueError(f"{path} is not a readable torch checkpoint ({what}): {' '.join(str(exc).split())[:200]}") from None
    for key in keys:
        if not isinstance(state, dict) or key not in state:
            found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} has no {key!r} entry ({what}); found {found}")
    if keys:
        entries = [state[key] for key in keys]
        if not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{path} does not hold a state dict of tensors ({what})")
        state = {f"{key}.{name}": v for key, e in zip(keys, entries) for name, v in e.items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors ({what})")
    return state


def _rename(key: str, mapping: list[tuple[str, str]]) -> str | None:
    for theirs, ours in mapping:
        if key == theirs or key.startswith(theirs + "."):
            return ours + key[len(theirs):]
    return None


def load_authors_state(module: nn.Module, state: dict[str, torch.Tensor], mapping: list[tuple[str, str]], path,
                       ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` (the authors' keys) into ``module`` after renaming each key by the first
    matching (authors' prefix, fastad prefix) pair of ``mapping``; keys under an ``ignore`` prefix
    are skipped. Every other key must map to one of ``module``'s keys with the same shape, and every
    key of ``module`` must be given: else ValueError naming them (nothing is loaded)."""
    own = module.state_dict()
    renamed, unknown = {}, []
    for k, v in state.items():
        if k.startswith(ignore) and ignore:
            continue
        ours = _rename(k, mapping)
        if ours is None or ours not in own:
            unknown.append(k)
        else:
            renamed[ours] = v
    missing = sorted(set(own) - set(renamed))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in renamed.items() if v.shape != own[k].shape]
    if unknown or missing or shapes:
        parts = [f"unexpected keys {sorted(unknown)[:4]}" if unknown else "", f"missing keys {missing[:4]}" if missing else "",
                 f"other shapes {shapes[:3]}" if shapes else ""]
        raise ValueError(f"{path} does not fit {type(module).__name__} in the authors' layout: "
                         + "; ".join(p for p in parts if p))
    module.load_state_dict(renamed)
