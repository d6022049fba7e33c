"""The label table: each label value's name and display colour (``docs/labels.json``), for the inference report,
previews, DICOM-SEG segment descriptions and the MONAI Label app."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: colours of values the table does not list (matplotlib's tab10, 0-255), picked by value
_DEFAULT_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int]  # RGB, 0-255


class LabelTable:
    """Label value -> :class:`Label`; a value the table does not list is ``object <value>`` in a default colour.

    Args:
        labels: ``{value: (name, (r, g, b))}`` or the content of a ``labels.json`` (``{"labels": [{"value",
            "name", "color"}, ...]}``).
    """

    def __init__(self, labels: Mapping | None = None) -> None:
        self._labels: dict[int, Label] = {}
        entries = (labels or {}).get("labels") if isinstance(labels, Mapping) and "labels" in labels else None
        if entries is not None:
            for entry in entries:
                self._add(entry["value"], entry["name"], entry["color"])
        else:
            for value, (name, color) in (labels or {}).items():
                self._add(value, name, color)

    def _add(self, value, name, color) -> None:
        rgb = tuple(int(c) for c in color)
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"label {value!r} ({name!r}): colour must be [r, g, b] in 0..255, got {color!r}")
        self._labels[int(value)] = Label(int(value), str(name), rgb)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> LabelTable:
        """The table in ``path`` (a ``labels.json``); None: an empty table (every value gets a default)."""
        if path is None:
            return cls()
        try:
            content = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"label table {str(path)!r} could not be read: {err}") from None
        if not isinstance(content, Mapping) or not isinstance(content.get("labels"), list):
            raise ValueError(f"label table {str(path)!r}: expected {{'labels': [{{'value', 'name', 'color'}}, ...]}}")
        try:
            return cls(content)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"label table {str(path)!r}: {err}") from None

    def __getitem__(self, value: int) -> Label:
        value = int(value)
        if value in self._labels:
            return self._labels[value]
        return Label(value, f"object {value}", _DEFAULT_COLOURS[value % len(_DEFAULT_COLOURS)])

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and value in self._labels

    def names(self) -> dict[str, int]:
        """Name -> value of every listed label but the background (value 0)."""
        return {label.name: value for value, label in self._labels.items() if value != 0}
