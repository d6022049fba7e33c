"""What names a case and what is wrong with one: the error every reader and parser raises, and the output names
derived from an image path. The lowest layer of the package (standard library only, Starlette where a MONAI Label
server has it), so that readers, transforms and datalists import it without importing each other."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path

_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr", ".dcm")


class CaseError(ValueError):
    """A case that cannot be segmented as given; the message names the case and the value."""


@functools.cache
def _missing_prompt_class() -> type[CaseError]:
    try:  # MONAI Label's stock apps run the bundle's transforms inside a Starlette (FastAPI) request
        from starlette.exceptions import HTTPException
    except ImportError:
        return CaseError

    class MissingPromptError(CaseError, HTTPException):
        def __init__(self, detail: str) -> None:
            HTTPException.__init__(self, status_code=422, detail=detail)
            ValueError.__init__(self, detail)

        def __str__(self) -> str:
            return str(self.detail)

    return MissingPromptError


def missing_prompt_error(message: str) -> CaseError:
    """The :class:`CaseError` for a request without a prompt. Where Starlette is installed (a MONAI Label server)
    it is also Starlette's ``HTTPException`` with status 422, so that a stock MONAI Label app, which calls the
    bundle's transforms in the request, answers a client error naming the problem instead of HTTP 500."""
    return _missing_prompt_class()(message)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """``name`` as one path component that stays inside its folder: letters, digits, ``.``, ``_`` and ``-``,
    no leading dot (so never ``.`` or ``..``); ``"case"`` if nothing is left."""
    return _UNSAFE.sub("_", str(name)).lstrip(".") or "case"


def case_name(image_path: str | os.PathLike) -> str:
    """The image's file name without its extension (a DICOM folder: the folder's name), after ``..`` and
    ``.`` are resolved, made safe as a file name (:func:`safe_name`)."""
    name = Path(os.path.abspath(str(image_path))).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return safe_name(name)


def unique_case_names(images: Sequence[str | os.PathLike], given: Sequence[str | None] | None = None) -> list[str]:
    """One distinct output name per case: ``given[i]`` where an entry names itself (``"case"``), else
    :func:`case_name`; names that collide (``a/ct.nii.gz`` and ``b/ct.nii.gz``) are prefixed with as many of
    their folders' names as it takes (``a_ct``, ``b_ct``), then numbered with the first suffix no other case
    has (``ct``, ``ct``, ``ct_2`` -> ``ct``, ``ct_3``, ``ct_2``): two cases never share an output."""
    paths = [Path(os.path.abspath(str(p))) for p in images]
    given = list(given) if given is not None else [None] * len(paths)
    names = [safe_name(g) if g else case_name(p) for p, g in zip(paths, given)]
    for depth in range(1, 1 + max((len(p.parts) for p in paths), default=1)):
        owners: dict[str, set[Path]] = {}
        for name, path in zip(names, paths):
            owners.setdefault(name, set()).add(path)
        clashing = [i for i, name in enumerate(names) if len(owners[name]) > 1 and not given[i]]
        if not clashing:
            break
        for i in clashing:
            folders = [safe_name(part) for part in paths[i].parent.parts[-depth:] if part not in ("/", "\\")]
            names[i] = "_".join([*folders, case_name(paths[i])])
    taken, seen = set(names), set()
    for i, name in enumerate(names):  # the same file listed twice
        if name in seen:
            number = 2
            while f"{name}_{number}" in taken:  # a file may be called ct_2 already
                number += 1
            names[i] = f"{name}_{number}"
            taken.add(names[i])
        seen.add(names[i])
    return names
