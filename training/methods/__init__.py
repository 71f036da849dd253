"""The self-supervised methods: one module each (a pure loss, a model, a `Method` entry), and
the registry the trainer, the config and the augmentations look methods up in.

from training.methods import REGISTRY, barlow_twins_loss, byol_loss, simsiam_loss
"""

from training.methods import barlow_twins, byol, simsiam
from training.methods.barlow_twins import BarlowTwins, barlow_twins_loss
from training.methods.base import Method, MethodModel
from training.methods.byol import BYOL, byol_loss, cosine_tau, ema_update
from training.methods.simsiam import SimSiam, simsiam_loss

# One line per method: name -> Method (training/methods/base.py)
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        barlow_twins.METHOD,
        byol.METHOD,
        simsiam.METHOD,
    )
}
METHODS = tuple(REGISTRY)


def get(name: str) -> Method:
    """The registry entry of `name`; ValueError naming the known methods otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None


__all__ = [
    "BYOL",
    "METHODS",
    "REGISTRY",
    "BarlowTwins",
    "Method",
    "MethodModel",
    "SimSiam",
    "barlow_twins_loss",
    "byol_loss",
    "cosine_tau",
    "ema_update",
    "get",
    "simsiam_loss",
]
