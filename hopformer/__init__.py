"""hopformer: modern Hopfield attention layers and Lightning training for ViTs and STanHop-Net.

The layers (``hopformer.layers``) and the functional core (``hopformer.functional``) are pure torch;
Lightning is imported only by ``hopformer.data``, ``hopformer.training`` and the CLI.

``import hopformer`` gives the layers as top-level names (``from hopformer import Hopfield,
SparseHopfield, HopfieldAttention, MultiheadHopfield, ...``: everything in ``hopformer.layers.__all__``)
and registers the Hopfield ViTs and ViH with timm (``timm.create_model("hopfield_vit_tiny_patch4_32")``,
``timm.list_models("hopfield_*")``); it does not import Lightning.
"""

from types import ModuleType as _ModuleType

from . import layers as _layers
from . import models  # noqa: F401  (registers the Hopfield ViTs and ViH with timm)

__version__ = "0.1.0"

_LAYER_NAMES = list(getattr(_layers, "__all__", None) or (
    name for name, value in vars(_layers).items() if not name.startswith("_") and not isinstance(value, _ModuleType)
))
globals().update({name: getattr(_layers, name) for name in _LAYER_NAMES})
__all__ = [*_LAYER_NAMES, "set_num_workers", "get_num_workers"]


def set_num_workers(n: "int | None") -> None:
    """Number of CPU worker threads of the sparse attention kernels: ``None`` (default) follows
    ``torch.get_num_threads()``, ``0`` or ``1`` turns the pool off. The environment variable
    ``HOPFORMER_NUM_WORKERS`` sets the initial value. See ``docs/performance.md``."""
    from .functional._separation_kernels import set_num_workers as _set

    _set(n)


def get_num_workers() -> int:
    """The number of CPU worker threads the sparse attention kernels use now (1: no pool)."""
    from .functional._separation_kernels import get_num_workers as _get

    return _get()
