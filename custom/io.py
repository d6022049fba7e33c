"""Reading and writing volumes, checked before anything is allocated or executed.

Readers: headers first (:func:`inspect_volume`, :func:`check_declared_size`), so that nothing is decompressed or
allocated for a volume that would be refused; NIfTI, NRRD/MHA and DICOM series through MONAI's readers; the
CVPR 2025 challenge's ``.npz`` cases without unpickling code (:func:`read_npz_case`). Writers: label maps as NIfTI,
NRRD or DICOM-SEG on the source series (:func:`write_label_map`), each written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import types
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
import torch
from monai.data import ITKReader, MetaTensor
from monai.data.utils import affine_to_spacing, compute_shape_offset, zoom_affine
from monai.transforms import LoadImage

from .cases import CaseError, case_name

logger = logging.getLogger(__name__)


def _source_name(image: Any) -> str:
    meta = getattr(image, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


#: image metadata key (JSON) of what the reader found or assumed about an input file (the DICOM series read, an
#: orientation taken for granted); :class:`SaveSegmentationd` copies it into the report
INPUT_NOTES = "input_notes"


#: NRRD ``space`` values with an anatomical meaning (ITK turns each into LPS), long and short forms
_NRRD_ANATOMICAL = frozenset(
    {"right-anterior-superior", "left-anterior-superior", "left-posterior-superior", "ras", "las", "lps"}
)


#: NRRD ``space`` values without one, which ITK (and so this bundle) reads as LPS; said so in the report
_NRRD_TAKEN_AS_LPS = frozenset({"scanner-xyz", "3d-right-handed", ""})


_DICOM_TAGS = {"uid": "0020|000e", "description": "0008|103e", "modality": "0008|0060", "position": "0020|0032"}


@dataclass
class DeclaredVolume:
    """What an image file's header declares, read without its voxels.

    Attributes:
        path: the file or DICOM folder.
        shape: array shape as stored (spatial axes first, then any channels or time points).
        spacing: voxel size in mm along the first three array axes.
        itemsize: bytes per voxel as stored (all components).
        dtype: the stored voxel type, in words.
        file_bytes: the size of the file (a DICOM series: of its files).
        reader: the MONAI reader to load it with (a DICOM series: the chosen series); None: MONAI's choice.
        notes: what was found or assumed, for the report (:data:`INPUT_NOTES`).
    """

    path: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    itemsize: int
    dtype: str
    file_bytes: int
    reader: Any = None
    notes: dict[str, str] = field(default_factory=dict)


def inspect_volume(path: str | os.PathLike, series_uid: str | None = None) -> DeclaredVolume | None:
    """Read an image's header (NIfTI, NRRD/MHA and other ITK formats, a DICOM series folder), not its voxels, and
    refuse what would otherwise be read silently wrong: RGB voxels, a voxel size of 0, an NRRD ``space`` without
    a known meaning, a folder of several DICOM series without ``series_uid``, a series whose slices are not evenly
    spaced. Returns None for a file type it does not know (MONAI reads it unchecked).

    Raises:
        CaseError: naming the file, the value and what was expected.
    """
    path = str(path)
    name = path.lower()
    if os.path.isdir(path):
        return _inspect_dicom_series(path, series_uid)
    if name.endswith((".nii", ".nii.gz")):
        return _inspect_nifti(path)
    if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")):
        return _inspect_itk_file(path)
    return None


def _check_spacing(path: str, spacing: Sequence[float], where: str) -> None:
    for axis, size in enumerate(spacing):
        if not np.isfinite(size) or size <= 0:
            raise CaseError(
                f"{path}: the voxel size along array axis {axis} is {size} ({where.format(index=axis + 1)}): the "
                "scan's true spacing is unknown (a reader would take 1 mm); write the real voxel size into the header"
            )


def _refuse_rgb(path: str, what: str) -> None:
    raise CaseError(f"{path}: RGB images are not supported ({what}); expected a single-channel 3D scan")


def _inspect_nifti(path: str) -> DeclaredVolume:
    image = nib.load(path)  # the header only: the voxels stay on disk
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as handle:  # as written: nibabel's own check replaces a voxel size of 0 by 1
        header = type(image.header).from_fileobj(handle, check=False)
    dtype = header.get_data_dtype()
    if dtype.fields is not None:
        _refuse_rgb(path, f"NIfTI datatype {int(header['datatype'])}, voxels of {dtype}")
    shape = tuple(int(n) for n in header.get_data_shape())
    sform = header.get_sform()
    if int(header["sform_code"]) > 0 and abs(np.linalg.det(sform[:3, :3])) > 1e-12:
        spacing = np.sqrt((sform[:3, :3] ** 2).sum(axis=0))  # the sform gives the geometry: pixdim is unused
    else:  # qform or plain pixdim geometry: both scale by pixdim
        spacing = np.abs(np.asarray(header["pixdim"][1:4], np.float64))
        _check_spacing(path, spacing[: min(len(shape), 3)], "pixdim[{index}] in the header, and no usable sform")
    return DeclaredVolume(
        path, shape, tuple(float(s) for s in spacing), dtype.itemsize, str(dtype), os.path.getsize(path)
    )


def _nrrd_space(path: str) -> str | None:
    """The ``space`` field of a NRRD header (lower case; ``""`` when it has none); None for other files."""
    if not path.lower().endswith((".nrrd", ".nhdr")):
        return None
    with open(path, "rb") as handle:
        text = handle.read(1 << 20).split(b"\n\n", 1)[0].decode("latin-1")
    for line in text.splitlines()[1:]:
        key, colon, value = line.partition(":")
        if colon and not line.startswith("#") and not value.startswith("=") and key.strip().lower() == "space":
            return value.strip().lower()
    return ""


def _itk_header(path: str):
    import itk

    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise CaseError(f"{path}: not an image file ITK can read")
    io.SetFileName(path)
    io.ReadImageInformation()
    return io


def _inspect_itk_file(path: str) -> DeclaredVolume:
    notes = {}
    space = _nrrd_space(path)
    if space is not None:
        base = space.removesuffix("-time")
        if base in _NRRD_TAKEN_AS_LPS:
            notes["geometry_assumed"] = (
                f"NRRD space {space or '(none)'!r} names no anatomical directions: its axes were taken as LPS "
                "(left, posterior, superior), as ITK reads them"
            )
            logger.warning("%s: %s", path, notes["geometry_assumed"])
        elif base not in _NRRD_ANATOMICAL:
            raise CaseError(
                f"{path}: NRRD space {space!r} is not supported: expected one of right-anterior-superior, "
                "left-anterior-superior, left-posterior-superior (or RAS, LAS, LPS), or scanner-xyz / 3D-right-handed "
                "/ none, which are read as LPS (a left-handed space would be mirrored)"
            )
    io = _itk_header(path)
    dims = io.GetNumberOfDimensions()
    pixel = io.GetPixelTypeAsString(io.GetPixelType())
    if pixel in ("rgb", "rgba"):
        _refuse_rgb(path, f"{pixel} pixels")
    shape = tuple(int(io.GetDimensions(i)) for i in range(dims))  # MONAI's ITK arrays are in ITK's (x, y, z) order
    spacing = tuple(float(io.GetSpacing(i)) for i in range(min(dims, 3)))
    _check_spacing(path, spacing, "in the header")
    components = int(io.GetNumberOfComponents())
    return DeclaredVolume(
        path,
        shape + ((components,) if components > 1 else ()),
        spacing,
        int(io.GetComponentSize()) * components,
        io.GetComponentTypeAsString(io.GetComponentType()),
        os.path.getsize(path),
        reader=ITKReader(),  # the same reading whether pynrrd is installed or not (its NrrdReader mirrors LAS)
        notes=notes,
    )


def _dicom_tags(path: str) -> tuple[Any, dict[str, str]]:
    io = _itk_header(path)
    meta = io.GetMetaDataDictionary()
    return io, {k: str(meta[tag]).strip() if meta.HasKey(tag) else "" for k, tag in _DICOM_TAGS.items()}


def _inspect_dicom_series(folder: str, series_uid: str | None) -> DeclaredVolume:
    import itk

    names = itk.GDCMSeriesFileNames.New()  # set up as MONAI's ITKReader does, so that its series names match
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")
    names.SetDirectory(folder)
    series = []
    for identifier in names.GetSeriesUIDs():
        files = list(names.GetFileNames(identifier))
        series.append((identifier, files, _dicom_tags(files[0])[1]))
    if not series:
        raise CaseError(f"{folder}: no DICOM series in this folder (expected the files of one series)")

    def listing(choices: Sequence[tuple[str, list[str], dict[str, str]]]) -> str:
        described = []
        for identifier, files, tags in choices:
            details = [f"{len(files)} files"] + [tags["modality"]] * bool(tags["modality"])
            details += [repr(tags["description"])] * bool(tags["description"])
            described.append(f"{tags['uid'] or identifier} ({', '.join(details)})")
        return "; ".join(described)

    chosen = series
    if series_uid:
        chosen = [s for s in series if str(series_uid) in (s[0], s[2]["uid"])]
        if not chosen:
            raise CaseError(f"{folder}: no DICOM series {series_uid!r} in this folder; it holds: {listing(series)}")
    if len(chosen) > 1:
        raise CaseError(
            f"{folder}: the folder holds {len(chosen)} DICOM series; give the entry's 'series_uid', one of: "
            + listing(chosen)
        )
    identifier, files, tags = chosen[0]
    io, _ = _dicom_tags(files[0])
    spacing = [float(io.GetSpacing(0)), float(io.GetSpacing(1)), 1.0]
    _check_spacing(folder, spacing[:2], "PixelSpacing of the series")
    notes = {"dicom_series_uid": tags["uid"] or identifier, "dicom_files": str(len(files))}
    if tags["description"]:
        notes["dicom_series_description"] = tags["description"]
    if tags["modality"]:
        notes["dicom_modality"] = tags["modality"]
    if len(files) > 1:
        spacing[2] = _dicom_slice_spacing(folder, tags["uid"] or identifier, files, notes)
    pixel = io.GetPixelTypeAsString(io.GetPixelType())
    if pixel in ("rgb", "rgba"):
        _refuse_rgb(folder, f"{pixel} pixels")
    components = int(io.GetNumberOfComponents())
    return DeclaredVolume(
        folder,
        (int(io.GetDimensions(0)), int(io.GetDimensions(1)), len(files)),  # ITK's (x, y, z), the array order read
        tuple(spacing),
        int(io.GetComponentSize()) * components,
        io.GetComponentTypeAsString(io.GetComponentType()),
        sum(os.path.getsize(f) for f in files),
        reader=ITKReader(series_name=identifier),
        notes=notes,
    )


def _dicom_slice_spacing(folder: str, uid: str, files: Sequence[str], notes: dict[str, str]) -> float:
    """The distance between the series' slices (in ITK's order), refusing uneven gaps, which ITK would spread
    evenly over the slices (misplacing them); a series without slice positions is stacked 1 mm apart, as ITK does,
    and the report says so."""
    positions, normal, missing = [], None, 0
    for name in files:
        io, tags = _dicom_tags(name)
        if not tags["position"]:
            missing += 1
            continue
        if normal is None:
            normal = np.asarray([io.GetDirection(2)[i] for i in range(3)], np.float64)
        positions.append(float(np.dot([io.GetOrigin(i) for i in range(3)], normal)))
    if missing == len(files):
        notes["geometry_assumed"] = "no slice positions (ImagePositionPatient): slices stacked 1 mm apart in file order"
        logger.warning("%s: %s", folder, notes["geometry_assumed"])
        return 1.0
    if missing:
        raise CaseError(f"{folder}: series {uid}: {missing} of {len(files)} slices lack ImagePositionPatient")
    gaps = np.diff(positions)
    if np.any(np.abs(gaps) < 1e-3):
        raise CaseError(
            f"{folder}: series {uid}: several slices lie at the same position ({len(files)} files for "
            f"{len(set(np.round(positions, 3)))} positions): more than one volume (echoes, phases, time points?) in "
            "one series; expected one slice per position"
        )
    if np.any(gaps > 0) and np.any(gaps < 0):
        raise CaseError(f"{folder}: series {uid}: the slices are not in position order; expected one stack")
    typical = float(np.median(np.abs(gaps)))
    uneven = np.abs(np.abs(gaps) - typical) > max(0.01 * typical, 1e-3)
    if uneven.any():
        k = int(np.argmax(uneven))
        evenly = np.linspace(positions[0], positions[-1], len(positions))
        raise CaseError(
            f"{folder}: series {uid}: slices are not evenly spaced: {abs(gaps[k]):.4g} mm between slice {k} and "
            f"{k + 1} ({Path(files[k]).name}, {Path(files[k + 1]).name}) where the others are {typical:.4g} mm apart "
            f"(a missing slice?); read as one volume they would be misplaced by up to "
            f"{np.abs(np.asarray(positions) - evenly).max():.3g} mm. Complete the series, or resample it to a regular "
            "grid (NIfTI or NRRD) first"
        )
    return typical


def available_memory() -> int | None:
    """Bytes a new allocation can take: Linux's ``MemAvailable``, within the container's (cgroup v2) limit; None
    where unknown."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = free if available is None else min(available, free)
    except (OSError, ValueError):
        pass
    return available


def network_grid_shape(shape: Sequence[int], spacing: Sequence[float], spacing_mm: Sequence[float]) -> list[int]:
    """The spatial shape the predictor's resampling (``Spacingd``, directions kept) gives a grid of ``shape`` voxels
    of ``spacing`` mm at ``spacing_mm``."""
    affine = np.diag([*[float(s) for s in spacing], 1.0])
    target = zoom_affine(affine, np.broadcast_to(np.asarray(spacing_mm, float), 3), diagonal=False)
    out, _ = compute_shape_offset(list(shape), affine, target, scale_extent=False)
    return [int(n) for n in out]


def check_declared_size(
    declared: DeclaredVolume, max_grid_voxels: int | None = None, spacing_mm: Sequence[float] | float | None = None
) -> None:
    """Refuse, before its voxels are read, a volume whose network grid (at ``spacing_mm``) would exceed
    ``max_grid_voxels`` (the predictor's limit) or that would not fit in the memory available: a gzip bomb or a
    header declaring a huge shape costs nothing to send and minutes and gigabytes to read.

    Raises:
        CaseError: with the declared shape, type and size, the file's size and the limit.
    """
    voxels = int(np.prod(declared.shape, dtype=object))
    shape = " x ".join(str(n) for n in declared.shape)
    said = (
        f"{declared.path}: the header declares {shape} voxels of {declared.dtype} ({voxels:,} voxels, "
        f"{voxels * 4 / 2**30:,.1f} GiB as float32) in {declared.file_bytes:,} bytes of file"
    )
    if max_grid_voxels is not None and spacing_mm is not None and len(declared.shape) >= 3:
        grid = network_grid_shape(declared.shape[:3], declared.spacing, spacing_mm)
        grid_voxels = int(np.prod(grid, dtype=object)) * int(np.prod(declared.shape[3:], dtype=object))
        if grid_voxels > int(max_grid_voxels):
            raise CaseError(
                f"{said}: at {list(np.broadcast_to(np.asarray(spacing_mm, float), 3))} mm that makes a "
                f"{tuple(grid)} network grid ({grid_voxels:,} voxels), above max_grid_voxels={int(max_grid_voxels):,}; "
                f"check the header's voxel size ({[round(s, 4) for s in declared.spacing]} mm), or raise the limit"
            )
    needed = voxels * (declared.itemsize + 4)  # as stored, then as float32
    available = available_memory()
    if available is not None and needed > available:
        raise CaseError(
            f"{said}: reading it needs about {needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB "
            "of memory available"
        )


def _check_path(
    path: str | os.PathLike,
    series_uid: str | None,
    max_grid_voxels: int | None,
    spacing_mm: Sequence[float] | float | None,
) -> DeclaredVolume | None:
    declared = inspect_volume(path, series_uid)
    if declared is not None:
        check_declared_size(declared, max_grid_voxels, spacing_mm)
    return declared


def load_volume(
    path: str | os.PathLike,
    series_uid: str | None = None,
    dtype: Any = np.float32,
    max_grid_voxels: int | None = None,
    spacing_mm: Sequence[float] | float | None = None,
) -> MetaTensor:
    """A volume file or DICOM series folder, channel first, read after the checks of :func:`inspect_volume` and
    :func:`check_declared_size`; its metadata's :data:`INPUT_NOTES` say what the reader found or assumed.

    Args:
        series_uid: the DICOM series to read from a folder holding several (SeriesInstanceUID).
        dtype: of the voxels (None: as stored).
        max_grid_voxels, spacing_mm: the predictor's grid limit and spacing (None: memory is the only limit).
    """
    declared = _check_path(path, series_uid, max_grid_voxels, spacing_mm)
    image = LoadImage(image_only=True, ensure_channel_first=True, dtype=dtype)(
        str(path), declared.reader if declared else None
    )
    image.meta[INPUT_NOTES] = json.dumps(declared.notes if declared else {})
    return image


def as_label_map(label: torch.Tensor, source: str) -> torch.Tensor:
    """A label map as int16, refusing values that are not whole numbers in -32768..32767 (a float label map
    cast silently would merge or drop classes: 1.5 becomes 1).

    Raises:
        CaseError: naming the file and a value.
    """
    values = torch.as_tensor(label.as_tensor() if isinstance(label, MetaTensor) else label)
    if values.is_floating_point():
        wrong = ~torch.isfinite(values) | (values != values.round())
        if wrong.any():
            raise CaseError(
                f"{source}: label values must be whole numbers (class values), found {float(values[wrong][0])!r} in "
                f"{int(wrong.sum()):,} voxels"
            )
    if values.numel() and (values.min() < -32768 or values.max() > 32767):
        raise CaseError(
            f"{source}: label values must lie in -32768..32767 (stored as int16), found {values.min().item()} .. "
            f"{values.max().item()}"
        )
    return label.to(torch.int16)


#: what an object array in a challenge ``.npz`` may hold besides dicts, lists, numbers and strings: numpy's own
#: array and scalar reconstruction (numpy 1 and 2 module names)
_NPZ_GLOBALS = frozenset(
    {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    | {("numpy", "ndarray"), ("numpy", "dtype")}
)


class _NumpyDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any other global (``os.system``...) is refused. ``np.load`` offers all or
    nothing (``allow_pickle``), and the challenge stores its boxes as an object array of dicts."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NPZ_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not data")
        return super().find_class(module, name)


def _npz_member(archive: zipfile.ZipFile, key: str) -> tuple[IO[bytes], tuple[int, ...], np.dtype]:
    """The open ``.npy`` member of ``key``, positioned after its header, and that header's shape and dtype."""
    handle = archive.open(f"{key}.npy")
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(handle)
    return handle, tuple(int(n) for n in shape), dtype


def _npz_object_array(archive: zipfile.ZipFile, path: str, key: str) -> np.ndarray:
    """An object array of a ``.npz`` through :class:`_NumpyDataUnpickler`."""
    handle, _, _ = _npz_member(archive, key)
    with handle:
        try:
            return np.asarray(_NumpyDataUnpickler(handle).load(), dtype=object)
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            raise CaseError(
                f"{path}: {key!r} holds Python objects that are not loaded (unpickling them could run code: {err}); "
                "expected dicts of numbers"
            ) from None


def read_npz_case(
    path: str | os.PathLike,
    image_key: str = "image",
    label_key: str | None = "label",
    max_grid_voxels: int | None = None,
    spacing_mm: Sequence[float] | float | None = None,
) -> dict[str, Any]:
    """A CVPR 2025 challenge case (see :class:`LoadCased`) as channel-first MetaTensors. Nothing in the file is
    executed: arrays are read with ``allow_pickle=False``, the boxes (an object array of dicts) by an unpickler
    that builds plain data only; each array's declared shape is checked (:func:`check_declared_size`) before it
    is read.

    Raises:
        CaseError: naming the file, the key and what was expected.
    """
    path = str(path)
    with zipfile.ZipFile(path) as archive, np.load(path, allow_pickle=False) as case:
        if "imgs" not in case.files:
            raise CaseError(f"{path}: a challenge case holds 'imgs' (D, H, W); found {sorted(case.files)}")

        def numeric(key: str) -> np.ndarray:
            handle, shape, dtype = _npz_member(archive, key)
            handle.close()
            if dtype.hasobject or dtype.fields is not None:
                raise CaseError(
                    f"{path}: {key!r} holds Python objects ({dtype}), which are not loaded (unpickling them could run "
                    "code); expected a numeric array"
                )
            if key in ("imgs", "gts"):
                size = os.path.getsize(path)
                check_declared_size(
                    DeclaredVolume(f"{path} ({key!r})", shape, tuple(spacing[::-1]), dtype.itemsize, str(dtype), size),
                    max_grid_voxels,
                    spacing_mm,
                )
            return case[key]

        spacing = np.asarray(numeric("spacing"), np.float64).ravel() if "spacing" in case.files else np.ones(3)
        if spacing.shape != (3,) or not np.all(spacing > 0):
            raise CaseError(f"{path}: 'spacing' must be 3 positive numbers (x, y, z), got {spacing.tolist()!r}")
        imgs = numeric("imgs")
        if imgs.ndim != 3:
            raise CaseError(f"{path}: 'imgs' must be (D, H, W), got shape {imgs.shape}")
        # the challenge's arrays are SimpleITK's (z, y, x) with its spacing in (x, y, z) order: array axis 0
        # runs along world z
        affine = torch.zeros(4, 4, dtype=torch.float64)
        affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = spacing[2], spacing[1], spacing[0], 1.0
        meta = {"filename_or_obj": path, INPUT_NOTES: "{}"}
        out: dict[str, Any] = {
            image_key: MetaTensor(torch.as_tensor(imgs.astype(np.float32))[None], affine=affine, meta=dict(meta))
        }
        if label_key is not None and "gts" in case.files:
            gts = numeric("gts")
            if gts.shape != imgs.shape:
                raise CaseError(f"{path}: 'gts' of shape {gts.shape} does not match 'imgs' {imgs.shape}")
            label = as_label_map(torch.as_tensor(gts)[None], f"{path} ('gts')")
            out[label_key] = MetaTensor(label, affine=affine, meta=dict(meta))
        if "boxes" in case.files:
            handle, _, dtype = _npz_member(archive, "boxes")
            handle.close()
            boxes = (_npz_object_array(archive, path, "boxes") if dtype.hasobject else case["boxes"]).ravel()
            try:
                parsed = [{str(k): int(v) for k, v in dict(b).items()} for b in boxes]
            except (TypeError, ValueError) as err:
                raise CaseError(f"{path}: 'boxes' must be dicts of numbers, one per class ({err})") from None
            out["challenge_boxes"] = json.dumps(parsed)
    return out


#: the label map formats :func:`write_label_map` writes (``output_ext`` of :class:`SaveSegmentationd`)
OUTPUT_EXTENSIONS = (".nii.gz", ".nrrd", ".dcm")


def check_output_ext(output_ext: str, cases: Any = None) -> str:
    """``output_ext`` if this bundle writes it, and, for ``.dcm`` (a DICOM-SEG, which refers to the slices of its
    source series), every case's image a DICOM series folder; checked before any work is done.

    Args:
        cases: a :class:`~custom.data.CaseList` (or a list of entries with ``image``).

    Raises:
        ValueError: naming ``output_ext``, the case and what was expected.
    """
    if output_ext not in OUTPUT_EXTENSIONS:
        raise ValueError(f"output_ext must be one of {', '.join(map(repr, OUTPUT_EXTENSIONS))}, got {output_ext!r}")
    if output_ext == ".dcm":
        for entry in getattr(cases, "cases", cases) or []:
            _check_dicom_source(entry.get("image"), entry.get("case"))
    return output_ext


def _check_dicom_source(image: Any, case: Any = None) -> str:
    source = image if isinstance(image, (str, os.PathLike)) else _source_name(image)
    if not os.path.isdir(str(source)):
        raise CaseError(
            f"case {case or case_name(str(source))!r}: output_ext '.dcm' writes a DICOM-SEG, which refers to the "
            f"slices of its source series, so the entry's 'image' must be a DICOM series folder; got {str(source)!r}. "
            "Use output_ext '.nii.gz' or '.nrrd' for this image"
        )
    return str(source)


def write_label_map(
    label_map: torch.Tensor,
    path: str | os.PathLike,
    like: str | None = None,
    labels: Any = None,
    series_uid: str | None = None,
    objects: Sequence[int] | None = None,
) -> None:
    """Write a ``(1, D, H, W)`` label map in the format of ``path``'s suffix (:data:`OUTPUT_EXTENSIONS`); the
    one writer of label maps.

    - ``.nii.gz``: int16 NIfTI, always 3D (a one-slice volume stays ``(D, H, 1)``). When ``like`` is the NIfTI
      file the label map was computed from, its header is kept (sform and qform with their codes, units,
      extensions): the output lies on exactly the input's grid, even where that header's geometry is unusual (a
      singular sform, which readers replace by the qform or pixdim geometry). Other inputs (NRRD, MHA, DICOM) get
      a header built from the affine.
    - ``.nrrd``: int16 NRRD (gzip) in LPS space, written by ITK from the affine, as ITK reads NRRD inputs.
    - ``.dcm``: a DICOM-SEG (binary, one segment per label value) of the DICOM series folder ``like`` (the series
      ``series_uid`` when the folder holds several), one frame per source slice that holds the object, segments
      named and coloured by ``labels`` (a :class:`~custom.labels.LabelTable`); a segment for each value in the
      label map and each prompted object's value in ``objects`` (an object that came out empty too).
    """
    name = str(path).lower()
    if name.endswith(".nrrd"):
        return _write_nrrd(label_map, path)
    if name.endswith(".dcm"):
        return _write_dicom_seg(label_map, path, _check_dicom_source(like), labels, series_uid, objects)
    values = np.asarray(label_map.detach().cpu() if isinstance(label_map, torch.Tensor) else label_map)[0]
    values = values.astype(np.int16)
    if like is not None and str(like).lower().endswith((".nii", ".nii.gz")) and Path(like).is_file():
        source = nib.load(like)
        if tuple(source.shape[:3]) == values.shape:
            header = source.header.copy()
            header.set_data_dtype(np.int16)
            header.set_slope_inter(1.0, 0.0)
            out = nib.Nifti1Image(values, None, header=header)
            out.header.set_sform(source.header.get_sform(), code=int(source.header["sform_code"]))
            out.header.set_qform(source.header.get_qform(), code=int(source.header["qform_code"]))
            nib.save(out, str(path))
            return
    nib.save(nib.Nifti1Image(values, _affine(label_map)), str(path))


def _affine(label_map: Any) -> np.ndarray:
    return np.asarray(label_map.affine if isinstance(label_map, MetaTensor) else np.eye(4), np.float64)


def _write_nrrd(label_map: torch.Tensor, path: str | os.PathLike) -> None:
    import itk

    values = np.asarray(label_map.detach().cpu() if isinstance(label_map, torch.Tensor) else label_map)[0]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _affine(label_map)  # MONAI's affines are RAS, ITK's LPS
    spacing = affine_to_spacing(lps)
    image = itk.image_from_array(np.ascontiguousarray(values.astype(np.int16).transpose(2, 1, 0)))  # ITK: z, y, x
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3] / spacing)))
    itk.imwrite(image, str(path), compression=True)


#: type 2 attributes of the source images that a DICOM-SEG copies (series written by tools that omit them)
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip


def _series_slices(folder: str, series_uid: str | None) -> list[Any]:
    """The slices (pydicom datasets) of the series read from ``folder``, as ITK chose it (the one series there,
    or ``series_uid``; GDCM's identifier may add details after the UID)."""
    import pydicom

    slices = []
    for name in sorted(os.listdir(folder)):
        try:
            ds = pydicom.dcmread(os.path.join(folder, name))
        except Exception:  # not a DICOM file: ITK skipped it too
            continue
        if "ImagePositionPatient" in ds and "PixelData" in ds:
            slices.append(ds)
    uids = {str(ds.SeriesInstanceUID) for ds in slices}
    if series_uid:
        # the UID, or GDCM's series identifier (the UID, then details)
        uids = {uid for uid in uids if uid == str(series_uid)} or {
            uid for uid in uids if str(series_uid).startswith(f"{uid}.")
        }
    if len(uids) != 1:
        raise CaseError(f"{folder}: cannot tell which DICOM series to refer to (series found: {sorted(uids)})")
    slices = [ds for ds in slices if str(ds.SeriesInstanceUID) in uids]
    for ds in slices:  # patient and study attributes of type 2 (present, may be empty) that a SEG copies
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return slices


def _slice_frame(values: np.ndarray, affine: np.ndarray, ds: Any, where: str) -> np.ndarray:
    """The ``(rows, columns)`` frame of ``values`` (on the grid of ``affine``, RAS) that lies on the DICOM slice
    ``ds``, each of its pixels at one voxel of the label map; refused if the slice is not on the grid."""
    to_ras = np.array([-1.0, -1.0, 1.0])
    position = np.asarray(ds.ImagePositionPatient, np.float64) * to_ras
    orientation = np.asarray(ds.ImageOrientationPatient, np.float64)
    row_spacing, column_spacing = (float(s) for s in ds.PixelSpacing)
    to_voxel = np.linalg.inv(affine)
    origin = to_voxel[:3, :3] @ position + to_voxel[:3, 3]
    along_column = to_voxel[:3, :3] @ (orientation[:3] * to_ras * column_spacing)  # next column: along a row
    along_row = to_voxel[:3, :3] @ (orientation[3:] * to_ras * row_spacing)
    rows, columns = int(ds.Rows), int(ds.Columns)
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    index = origin + r[..., None] * along_row + c[..., None] * along_column
    voxel = np.rint(index).astype(np.int64)
    if np.abs(index - voxel).max() > 0.05 or (voxel < 0).any() or (voxel >= np.array(values.shape)).any():
        raise CaseError(f"{where}: slice {ds.SOPInstanceUID} does not lie on the segmented image's voxel grid")
    return values[voxel[..., 0], voxel[..., 1], voxel[..., 2]]


def _cielab(rgb: Sequence[int]) -> list[int]:
    """sRGB (0-255) -> DICOM's scaled CIELab (0-65535), for RecommendedDisplayCIELabValue."""
    linear = [((c / 255 + 0.055) / 1.055) ** 2.4 if c / 255 > 0.04045 else c / 255 / 12.92 for c in rgb]
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    f = [t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116 for t in xyz / [0.95047, 1.0, 1.08883]]
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return [round(lab[0] * 65535 / 100), round((lab[1] + 128) * 65535 / 255), round((lab[2] + 128) * 65535 / 255)]


class _NumPyWithFloat_(types.ModuleType):
    """NumPy as highdicom 0.22 (the last release for pydicom 2, which MONAI Label's pins need) expects it:
    with ``float_``, which NumPy 2 removed; given to highdicom's ``seg.sop`` module only."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _highdicom() -> Any:
    import highdicom as hd
    from highdicom.seg import sop

    if not hasattr(sop.np, "float_"):
        sop.np = _NumPyWithFloat_("numpy")
    return hd


def _write_dicom_seg(
    label_map: torch.Tensor,
    path: str | os.PathLike,
    folder: str,
    labels: Any,
    series_uid: str | None,
    requested: Sequence[int] | None,
) -> None:
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from .labels import LabelTable

    hd = _highdicom()
    labels = labels if labels is not None else LabelTable()
    values = np.asarray(label_map.detach().cpu() if isinstance(label_map, torch.Tensor) else label_map)[0]
    values = values.astype(np.int64)
    slices = _series_slices(folder, series_uid)
    if len(slices) != values.shape[2]:
        raise CaseError(f"{folder}: {len(slices)} slices in the series, the segmented image has {values.shape[2]}")
    frames = np.stack([_slice_frame(values, _affine(label_map), ds, folder) for ds in slices])
    present = sorted(int(v) for v in np.unique(values) if v > 0)
    described = sorted(set(present) | {int(v) for v in requested or () if int(v) > 0}) or [1]
    numbers = np.zeros(max(described) + 1, np.uint16)  # label value -> segment number (1, 2, ...)
    numbers[described] = np.arange(1, len(described) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="SAM-Med3D MONAI bundle", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    descriptions = []
    for number, value in enumerate(described, start=1):
        label = labels[value]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name,
            segmented_property_category=Code("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=Code("113343008", "SCT", "Organ"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"label {value}",
            tracking_uid=hd.UID(),
        )
        description.RecommendedDisplayCIELabValue = _cielab(label.color)
        descriptions.append(description)
    try:
        seg = _segmentation(hd, slices, frames, numbers, descriptions, present)
    except (ValueError, AttributeError, TypeError) as err:  # what the source series lacks for a SEG
        raise CaseError(f"{folder}: no DICOM-SEG can refer to this series: {err}") from err
    seg.save_as(str(path))


def _segmentation(hd: Any, slices: list, frames: np.ndarray, numbers: np.ndarray, descriptions: list, present: list):
    return hd.seg.Segmentation(
        source_images=slices,
        pixel_array=numbers[np.clip(frames, 0, len(numbers) - 1)],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(slices[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MONAI",
        manufacturer_model_name="SAM-Med3D bundle",
        software_versions="1",
        device_serial_number="none",
        series_description="SAM-Med3D segmentation",
        omit_empty_frames=bool(present),  # a SEG needs at least one frame
    )
