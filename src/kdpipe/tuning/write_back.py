"""The best trial's settings written into the params file, its comments and order kept.

ruamel.yaml's round trip, not PyYAML: a user's params.yaml carries comments (why a value is
what it is) that a load-and-dump would drop. It arrives with DVC, which edits params files
the same way.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from yaml import safe_load

from kdpipe.atomic import atomic_file
from kdpipe.config import NotASection, parent_of, validate
from kdpipe.errors import ConfigError


def write_settings(path: Path, values: dict[str, Any]) -> list[str]:
    """Set each ``key.sub: value`` of ``values`` in the params file at ``path`` (made when
    missing: the other settings keep their defaults), atomically, once the result loads.
    Returns one ``key old → new`` line per changed setting."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    # The round-trip loader builds plain YAML types only (no Python objects, like safe_load).
    round_trip = YAML(typ="rt")
    round_trip.preserve_quotes = True
    doc = round_trip.load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    changed = []
    for key, value in values.items():
        try:
            node, last = parent_of(doc, key, make=CommentedMap)
        except NotASection as exc:
            raise ConfigError(f"{path}: {exc} is a value, not a section, so {key} cannot "
                              "be written") from None
        old = node.get(last, "(default)")
        if old != value:
            changed.append(f"{key} {old} → {value}")
        node[last] = value
    text = io.StringIO()
    round_trip.dump(doc, text)
    validate(safe_load(text.getvalue()) or {}, str(path))  # loads, or nothing is written
    with atomic_file(path) as handle:
        handle.write(text.getvalue())
    return changed
