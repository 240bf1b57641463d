"""hopformer: modern Hopfield attention layers and Lightning training for ViTs and STanHop-Net.

The layers (``hopformer.layers``) and the functional core (``hopformer.functional``) are pure torch;
Lightning is imported only by ``hopformer.data``, ``hopformer.training`` and the CLI.
"""

__version__ = "0.1.0"


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
