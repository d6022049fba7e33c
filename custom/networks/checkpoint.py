"""Reading SAM-Med3D checkpoints in every format users meet, and writing them safely.

Accepted files:

- the upstream training file: a dict with ``model_state_dict`` (plus optimiser state, ``args``...);
- ``{"model": state_dict}`` (this bundle's format);
- a bare state dict.

A ``module.`` prefix (DataParallel / DDP) is stripped. Files are read with ``torch.load(weights_only=True)``;
the older upstream releases hold pickled Python objects and need ``allow_pickle=True``, which executes
code from the file: only for files from a trusted source.

Two conventions change what loaded weights compute without changing a single shape: the encoder's
relative-position bias (``"rel_pos_bias"``: ``"upstream"`` or ``"decomposed"``) and the dense positional
encoding's swap of axes 0 and 1 (``"dense_pe_axis_swap"``). Files this bundle's training writes
(:func:`checkpoint_payload`) record both beside ``"model"``. A bundle's shipped ``models/model.pt`` is a bare
state dict, as the model zoo and ``monai.bundle.load`` expect; its conventions are recorded in the bundle's
``configs/metadata.json`` (:func:`bundle_conventions`). A file that records neither, anywhere, comes from the
upstream code: ``"upstream"`` bias, axes swapped. Loading a file into a network with other conventions is
refused: the weights would load, and silently compute something else than what they were trained for.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import write_atomic
from .common import as_flag
from .image_encoder import REL_POS_BIASES

OFFICIAL_WEIGHTS_HINT = (
    "The official weights are sam_med3d_turbo.pth in the Hugging Face repository blueyo0/SAM-Med3D "
    "(402 MB); `python bundle/scripts/convert_checkpoint.py --src FILE --dst model.pt` turns any accepted "
    "file into {'model': state_dict}."
)
_WRAPPER_KEYS = ("model_state_dict", "model")
REL_POS_BIAS_KEY = "rel_pos_bias"
DENSE_PE_AXIS_SWAP_KEY = "dense_pe_axis_swap"
#: what a file that does not record its conventions holds: the upstream code's
UNDECLARED_REL_POS_BIAS = "upstream"
UNDECLARED_DENSE_PE_AXIS_SWAP = True


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did with a file's entries."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def describe(self, limit: int = 20) -> str:
        """Human-readable summary naming up to ``limit`` keys of each kind."""
        lines = [f"{len(self.loaded)} tensors loaded"]
        for title, keys in (
            ("missing from the file", self.missing),
            ("unexpected in the file", self.unexpected),
            ("shape mismatch", self.shape_mismatches),
        ):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
                lines.append(f"{len(keys)} {title}: {shown}")
        return "; ".join(lines)


@dataclass
class CheckpointFile:
    """A checkpoint file's state dict and the conventions recorded for it (None: none recorded), in the file or
    in its bundle's ``metadata.json`` (``conventions_source`` says which)."""

    state: dict[str, torch.Tensor]
    rel_pos_bias: str | None
    source: str
    dense_pe_axis_swap: bool | None = None
    conventions_source: str | None = None

    @property
    def effective_rel_pos_bias(self) -> str:
        """The bias the weights were trained with: as recorded, else the upstream code's."""
        return self.rel_pos_bias or UNDECLARED_REL_POS_BIAS

    @property
    def effective_dense_pe_axis_swap(self) -> bool:
        """Whether the weights were trained with the axis swap: as recorded, else the upstream code's (yes)."""
        return UNDECLARED_DENSE_PE_AXIS_SWAP if self.dense_pe_axis_swap is None else self.dense_pe_axis_swap


def bundle_conventions(path: str | os.PathLike) -> tuple[dict[str, Any], str] | None:
    """The conventions a bundle records for its model file: ``path`` is ``<bundle>/models/<file>`` and
    ``<bundle>/configs/metadata.json`` names them (``rel_pos_bias``, ``dense_pe_axis_swap``); else None.

    Returns:
        (the recorded conventions, the metadata file's path).

    Raises:
        ValueError: the metadata file exists but is not valid JSON.
    """
    path = Path(path)
    metadata = path.parent.parent / "configs" / "metadata.json"
    if path.parent.name != "models" or not metadata.is_file():
        return None
    try:
        recorded = json.loads(metadata.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"bundle metadata {str(metadata)!r} (conventions of {str(path)!r}) is not valid JSON: {err}")
    found = {k: recorded[k] for k in (REL_POS_BIAS_KEY, DENSE_PE_AXIS_SWAP_KEY) if k in recorded}
    return (found, str(metadata)) if found else None


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> CheckpointFile:
    """Read any accepted checkpoint file (see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no recognisable state dict, or needs ``allow_pickle=True``.
    """
    path, allow_pickle = Path(path), as_flag(allow_pickle, "allow_pickle")
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {str(path)!r} is a directory; expected a checkpoint file in it or elsewhere"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist. {OFFICIAL_WEIGHTS_HINT}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes): an interrupted download or copy?")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {str(path)!r} holds pickled Python objects that torch.load(weights_only=True) refuses "
            "(the older upstream releases do). If you trust the file, pass allow_pickle=True (it runs code "
            "stored in the file), or convert it once with `python bundle/scripts/convert_checkpoint.py "
            f"--src {path} --dst model.pt --allow_pickle True`. Detail: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        detail = str(err).strip() or type(err).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} ({path.stat().st_size:,} bytes) could not be read as a PyTorch file: {detail}"
        ) from err
    recorded, where = {}, str(path)
    if isinstance(obj, Mapping):
        recorded = {k: obj[k] for k in (REL_POS_BIAS_KEY, DENSE_PE_AXIS_SWAP_KEY) if k in obj}
    if not recorded and (from_bundle := bundle_conventions(path)) is not None:
        recorded, where = from_bundle
    bias, swap = recorded.get(REL_POS_BIAS_KEY), recorded.get(DENSE_PE_AXIS_SWAP_KEY)
    if bias is not None and bias not in REL_POS_BIASES:
        raise ValueError(f"{where!r} records an unknown {REL_POS_BIAS_KEY} {bias!r}; expected one of {REL_POS_BIASES}")
    if swap is not None and not isinstance(swap, bool):
        raise ValueError(f"{where!r} records {DENSE_PE_AXIS_SWAP_KEY}={swap!r}; expected true or false")
    return CheckpointFile(extract_state_dict(obj, source=str(path)), bias, str(path), swap, where)


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of any accepted checkpoint file (prefix ``module.`` stripped); see :func:`open_checkpoint`."""
    return open_checkpoint(path, allow_pickle).state


def network_rel_pos_bias(network: nn.Module) -> str | None:
    """The relative-position bias of ``network``'s image encoder (None: it has no such encoder)."""
    return getattr(getattr(network, "image_encoder", None), "rel_pos_bias", None)


def network_dense_pe_axis_swap(network: nn.Module) -> bool | None:
    """Whether ``network``'s prompt encoder swaps axes 0 and 1 in its dense encoding (None: it has no such
    encoder)."""
    pe_layer = getattr(getattr(network, "prompt_encoder", None), "pe_layer", None)
    return None if pe_layer is None else bool(pe_layer.swap_dense_axes)


def check_conventions(network: nn.Module, checkpoint: CheckpointFile) -> None:
    """Refuse a file whose weights were trained with other conventions than ``network``'s (module docstring).

    Raises:
        ValueError: naming the file, where its conventions are recorded, both values and how to proceed.
    """
    check_rel_pos_bias(network, checkpoint)
    expected = network_dense_pe_axis_swap(network)
    if expected is None or checkpoint.effective_dense_pe_axis_swap == expected:
        return
    recorded = (
        f"{checkpoint.conventions_source!r} records {DENSE_PE_AXIS_SWAP_KEY}={checkpoint.dense_pe_axis_swap}"
        if checkpoint.dense_pe_axis_swap is not None
        else f"checkpoint {checkpoint.source!r} records no {DENSE_PE_AXIS_SWAP_KEY}, so it is taken as an upstream "
        f"file ({UNDECLARED_DENSE_PE_AXIS_SWAP})"
    )
    raise ValueError(
        f"{recorded}, but the network uses {DENSE_PE_AXIS_SWAP_KEY}={expected}: the weights would read their "
        "dense positional encoding with axes 0 and 1 exchanged. Build the variant the file was trained as, or "
        "record the file's convention with `python bundle/scripts/convert_checkpoint.py --src FILE --dst NEW_FILE "
        f"--{DENSE_PE_AXIS_SWAP_KEY} BOOL`."
    )


def check_rel_pos_bias(network: nn.Module, checkpoint: CheckpointFile) -> None:
    """Refuse a file whose weights were trained with another relative-position bias than ``network``'s.

    Raises:
        ValueError: naming the file, both biases, and how to proceed.
    """
    expected = network_rel_pos_bias(network)
    if expected is None or checkpoint.effective_rel_pos_bias == expected:
        return
    recorded = (
        f"records rel_pos_bias={checkpoint.rel_pos_bias!r}"
        + (f" (in {checkpoint.conventions_source!r})" if checkpoint.conventions_source != checkpoint.source else "")
        if checkpoint.rel_pos_bias
        else f"records no rel_pos_bias, so it is taken as an upstream file ({UNDECLARED_REL_POS_BIAS!r})"
    )
    raise ValueError(
        f"checkpoint {checkpoint.source!r} {recorded}, but the network uses rel_pos_bias={expected!r}: the "
        "weights would compute another attention than the one they were trained with. Build the network with "
        f"rel_pos_bias={checkpoint.effective_rel_pos_bias!r} (or the variant that file was trained as). A "
        "sam_med3d_lite file written by this bundle before the record existed is declared once with `python "
        "bundle/scripts/convert_checkpoint.py --src FILE --dst NEW_FILE --rel_pos_bias decomposed`."
    )


def checkpoint_payload(network: nn.Module) -> dict[str, Any]:
    """What this bundle's training writes for a network: ``{"model": state_dict, "rel_pos_bias": ...,
    "dense_pe_axis_swap": ...}`` (the conventions the network has)."""
    payload: dict[str, Any] = {"model": network.state_dict()}
    bias, swap = network_rel_pos_bias(network), network_dense_pe_axis_swap(network)
    if bias is not None:
        payload[REL_POS_BIAS_KEY] = bias
    if swap is not None:
        payload[DENSE_PE_AXIS_SWAP_KEY] = swap
    return payload


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object, with any ``module.`` prefix removed."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"{source} holds no state dict: expected a dict of tensors, {{'model': ...}} or "
            f"{{'model_state_dict': ...}}; found {found}"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def compare_state_dicts(model_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor]) -> LoadReport:
    """Which file entries fit the model (same name and shape), and which do not."""
    report = LoadReport()
    for key, value in file_state.items():
        if key not in model_state:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(model_state[key].shape):
            report.shape_mismatches.append(f"{key} (file {tuple(value.shape)}, model {tuple(model_state[key].shape)})")
        else:
            report.loaded.append(key)
    report.missing = [key for key in model_state if key not in file_state]
    return report


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, strict: bool = True, allow_pickle: bool = False
) -> LoadReport:
    """Load an accepted checkpoint file into ``model``.

    Args:
        model: the network (for example from ``build_sam_med3d``).
        path: the file.
        strict: fail unless every model entry is in the file with the same shape and nothing is left over.
            Without it, the entries that fit are loaded and the rest reported.
        allow_pickle: read with ``weights_only=False`` (older upstream files; trusted sources only).

    Returns:
        the :class:`LoadReport`.

    Raises:
        ValueError: with ``strict``, when keys are missing, unexpected or of another shape (all named); and
            always when the file's conventions are not the model's (:func:`check_conventions`).
    """
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    file_state = checkpoint.state
    broken = [k for k, v in file_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(
            f"checkpoint {str(path)!r}: {len(broken)} tensors hold NaN or infinite values (e.g. "
            f"{', '.join(broken[:5])}): a diverged training run? Use an earlier checkpoint."
        )
    report = compare_state_dicts(model.state_dict(), file_state)
    if strict and not report.ok:
        box_hint = ""
        if any("box_corner_embeddings" in key for key in report.unexpected + report.missing):
            box_hint = (
                " The file and the network disagree on box embeddings: build the network as the file was trained "
                f"(--network_def#box_prompts {'True' if report.unexpected else 'False'})."
            )
        raise ValueError(
            f"checkpoint {str(path)!r} does not match {type(model).__name__}: {report.describe()}. "
            "Is --network_name the variant this file was trained with?" + box_hint
        )
    check_conventions(model, checkpoint)
    model.load_state_dict({k: file_state[k] for k in report.loaded}, strict=False)
    return report


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`custom.files.write_atomic`: never a half-written file."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))
