"""The three self-supervised methods: one module each, a pure loss and a model wrapper.

from training.methods import barlow_twins_loss, byol_loss, simsiam_loss
"""

from training.methods.barlow_twins import BarlowTwins, barlow_twins_loss
from training.methods.byol import BYOL, byol_loss, cosine_tau, ema_update
from training.methods.simsiam import SimSiam, simsiam_loss

METHODS = ("barlow_twins", "byol", "simsiam")

__all__ = [
    "BYOL",
    "METHODS",
    "BarlowTwins",
    "SimSiam",
    "barlow_twins_loss",
    "byol_loss",
    "cosine_tau",
    "ema_update",
    "simsiam_loss",
]
