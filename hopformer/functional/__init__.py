"""Pure-torch functional core: separation maps, Hopfield retrieval and energies (no Lightning)."""

from .separation import (
    SEPARATIONS,
    check_separation,
    entmax,
    entmax15,
    is_softmax,
    separate,
    separated_attention,
    separation_conjugate,
    softmax,
    sparsemax,
)
from ._separation_kernels import get_kernel_path, set_kernel_path
from .hopfield import as_additive_mask, association, hopfield_energy, hopfield_retrieve
from .separation_loss import (
    SEPARATION_LOSSES,
    min_pairwise_distance,
    pairwise_sq_distances,
    separation_loss,
    separation_loss_from_gram,
)
from .continuous import (
    continuous_energy,
    continuous_retrieve,
    masked_ridge_coefficients,
    ridge_coefficients,
    ridge_factor,
)
