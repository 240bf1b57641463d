"""Pure-torch functional core: separation maps, Hopfield retrieval and energies (no Lightning)."""

from .separation import (
    SEPARATIONS,
    check_separation,
    entmax,
    entmax15,
    is_softmax,
    separate,
    separation_conjugate,
    softmax,
    sparsemax,
)
from .hopfield import as_additive_mask, association, hopfield_energy, hopfield_retrieve
from .separation_loss import SEPARATION_LOSSES, separation_loss
from .continuous import (
    continuous_energy,
    continuous_retrieve,
    masked_ridge_coefficients,
    ridge_coefficients,
    ridge_factor,
)
