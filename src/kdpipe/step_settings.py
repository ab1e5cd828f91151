"""The settings one step reads, and nothing else.

A step declares the params.yaml keys it reads (``kdpipe.pipeline.STEPS``): whole sections
(``"teacher"``) or single keys (``"ingest.max_length"``). From that declaration:

- ``subset`` gives those settings alone, as a nested dict: what a Kubeflow task receives, so
  KFP's cache key of a task changes only when one of its own settings does;
- ``view`` gives the step a read-only view of the whole ``Config`` that raises
  ``UndeclaredSetting`` the moment the step reads a key it did not declare. A KFP task
  would otherwise get that key's *default* silently; every ``kdpipe run`` and every test
  that runs a step through the declaration checks the declaration instead.

(Written here rather than taken from a library: pydantic has field include/exclude for
dumping, but no read guard on attribute access.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from kdpipe.config import Config, validate

# A tree of what may be read: {field: True (all of it) or a subtree}.
Allowed = dict[str, Any]


class UndeclaredSetting(RuntimeError):
    """A step read a setting its declaration does not list: a bug in kdpipe, not user input
    (so not a KdpipeError, which the CLI would print as the user's problem)."""


def tree(keys: Iterable[str]) -> Allowed:
    """``["teacher", "ingest.max_length"]`` -> ``{"teacher": True, "ingest": {"max_length":
    True}}``; a whole section wins over keys inside it."""
    allowed: Allowed = {}
    for key in keys:
        node = allowed
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if child is True:
                break
            node = child
        else:
            node[last] = True
    return allowed


def check_keys(keys: Iterable[str]) -> None:
    """Raise ValueError for a declared key that is not a setting of ``Config``."""
    for key in keys:
        model: type[BaseModel] | None = Config
        for part in key.split("."):
            if model is None or part not in model.model_fields:
                raise ValueError(f"{key}: not a setting of params.yaml")
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(
                annotation, BaseModel) else None


def subset(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """The declared settings of ``cfg`` as a nested dict of JSON values, in params.yaml's
    order."""
    return _pick(cfg.model_dump(mode="json"), tree(keys))


def from_subset(doc: dict[str, Any], label: str) -> Config:
    """A Config from ``subset``'s output: the given settings, defaults for the rest (which a
    ``view`` with the same keys never lets the step read)."""
    return validate(doc, label)


def view(cfg: Config, keys: Iterable[str], step: str) -> Config:
    """``cfg`` as ``step`` may see it: reading an undeclared setting raises
    ``UndeclaredSetting``. Typed as Config, since steps use it as one."""
    return _View(cfg, tree(keys), "", step)  # type: ignore[return-value]


def _pick(doc: dict[str, Any], allowed: Allowed) -> dict[str, Any]:
    return {name: value if allowed[name] is True else _pick(value, allowed[name])
            for name, value in doc.items() if name in allowed}


class _View:
    """Reads of a pydantic model's fields pass only where ``allowed`` says; sections come
    back as views of their own; everything else (methods, ``paths``) is looked up on the
    model, with properties evaluated against the view so ``cfg.paths`` reads ``work_dir``
    through it."""

    __slots__ = ("_model", "_allowed", "_where", "_step")

    def __init__(self, model: BaseModel, allowed: Allowed, where: str, step: str) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_step", step)

    def __getattr__(self, name: str) -> Any:
        model = self._model
        if name in type(model).model_fields:
            key = f"{self._where}{name}"
            rule = self._allowed.get(name)
            if rule is None:
                raise UndeclaredSetting(
                    f"step {self._step!r} read {key}, which its declaration in "
                    "kdpipe.pipeline.STEPS does not list: add it there (and to dvc.yaml)")
            value = getattr(model, name)
            return value if rule is True else _View(value, rule, f"{key}.", self._step)
        attribute = getattr(type(model), name, None)
        if isinstance(attribute, property):
            return attribute.fget(self)
        return getattr(model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only inside step {self._step!r}")

    def __repr__(self) -> str:
        return f"<settings of step {self._step!r}: {self._model!r}>"
