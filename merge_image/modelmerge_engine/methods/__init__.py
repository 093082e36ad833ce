"""The merge methods, one module per method (or per family, its variants as configuration), in a registry in
the style of mergekit's: `@register` on a `Method` subclass makes it the engine's implementation of the contract
method of that name. The engine dispatches through `method_class`; a name without a module is an error naming
it, never another method's code.

Adding a method: its module here (imported below), its entry in the contract's catalogue (modelmerge/contract.py:
MergeMethod, METHODS; tests/test_methods_registry.py checks that both agree), its tests, and the regenerated CRDs.
"""

from __future__ import annotations

from modelmerge_engine.errors import MergeError
from modelmerge_engine.methods.base import Method

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: `cls` implements the method `cls.name`; a name registered twice is an error."""
    if cls.name in REGISTRY:
        raise ValueError(f"merge method {cls.name!r} is registered twice: {REGISTRY[cls.name].__module__} and "
                         f"{cls.__module__}")
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The implementation of merge method `name`."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergeError(f"merge_method: the engine has no implementation of {name!r} (it has "
                         f"{', '.join(sorted(REGISTRY))})") from None


# The modules register their methods on import (after `register` exists).
from modelmerge_engine.methods import (  # noqa: E402, F401
    average_merging,
    generalized_task_arithmetic,
    karcher,
    linear,
    mask_merging,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    sce,
    slerp,
    task_arithmetic,
    ties_merging,
)
