"""Values the data determines, linked from the data module into the model (``HopformerCLI``).

A config states each of them once, on the data side; the CLI copies it into the model:

==================================  ===============================================  ===========
source (data)                       target (model)                                   applied on
==================================  ===============================================  ===========
``data.init_args.input_len``        ``model.init_args.model.init_args.input_len``    parse
``data.init_args.horizon``          ``model.init_args.model.init_args.horizon``      parse
``data.num_series`` (CSV columns)   ``model.init_args.model.init_args.num_series``   instantiate
``data.num_classes``                ``model.init_args.num_classes``                  instantiate
==================================  ===============================================  ===========

jsonargparse skips a link whose source is missing (a data module without ``horizon`` or ``num_classes``)
or whose target the chosen model class lacks (``ClassificationModule`` has no ``model.init_args.horizon``),
so the same four links serve every task. Giving a target on the command line is an error that names
the data option to use instead (:func:`check_no_linked_options`); a target stated in a config file is
overwritten by the data's value.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

__all__ = ["LINKS", "add_data_links", "check_no_linked_options", "keep_link_paths"]

# (source, target, apply_on)
LINKS: tuple[tuple[str, str, str], ...] = (
    ("data.init_args.input_len", "model.init_args.model.init_args.input_len", "parse"),
    ("data.init_args.horizon", "model.init_args.model.init_args.horizon", "parse"),
    ("data.num_series", "model.init_args.model.init_args.num_series", "instantiate"),
    ("data.num_classes", "model.init_args.num_classes", "instantiate"),
)


def add_data_links(parser: ArgumentParser) -> None:
    for source, target, apply_on in LINKS:
        parser.link_arguments(source, target, apply_on=apply_on)


def _plain(key: str) -> str:
    """``key`` without ``init_args`` parts (jsonargparse accepts ``--model.num_classes`` for ``--model.init_args.num_classes``)."""
    return ".".join(part for part in key.split(".") if part != "init_args")


def check_no_linked_options(explicit: list[str]) -> None:
    """``ValueError`` when a command-line option sets a value that the data determines."""
    for source, target, _ in LINKS:
        for key in explicit:
            if _plain(key) == _plain(target):
                hint = (f"change --{source} instead" if ".init_args." in source
                        else f"it follows the data module's {source.split('.')[-1]}")
                raise ValueError(f"--{key} is set from the data ({source} -> {target}): do not give it; {hint}")


def keep_link_paths(dump: dict) -> None:
    """Give every linked model target's class an ``init_args`` dict in LightningCLI's config dump.

    Lightning writes the values of instantiation links into the dumped config (the module's saved
    hyperparameters), and needs the path to exist; jsonargparse's dump drops an ``init_args`` whose keys are
    all link targets (``RepeatLast``: input_len, horizon, num_series).
    """
    for _, target, _ in LINKS:
        node = dump
        for part in target.split(".")[:-1]:
            if isinstance(node, dict) and part == "init_args" and "class_path" in node:
                node = node.setdefault("init_args", {})
            elif isinstance(node, dict) and isinstance(node.get(part), dict):
                node = node[part]
            else:
                break
