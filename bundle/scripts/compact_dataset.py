"""A compact copy of an MSD-style dataset for a machine reached through a small transfer (a lent GPU: 64 MiB).

    python bundle/scripts/compact_dataset.py --src data/openkbp --dst .gpu/data/openkbp --margin_mm 48

Each case is cropped to its labels' bounding box plus ``margin_mm`` (training windows never reach further: half a
window plus the largest offset of ``CropAroundClickd``, 48 + 24 mm for the shipped variant's 96 mm window when the
first click is at the box's edge; the rest is zero-padded as at an image border) and stored in one byte per voxel
with the NIfTI scale slope, which every reader applies: CT clamped to the training range [-1000, 1000] HU in 8 HU
steps (below CT noise), other modalities in 256 levels of their own range (the crop normalisation is a z-score
over positive voxels, unchanged by a scale). Labels are stored as uint8. ``max_validation`` keeps the first cases
of the validation list. The copy's ``dataset.json`` keeps the source's names, modality and labels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import numpy as np

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT.parent))

CT_RANGE_HU = (-1000.0, 1000.0)
CT_STEP_HU = 8.0


def quantise(data: np.ndarray, is_ct: bool) -> tuple[np.ndarray, float]:
    """``data`` -> (one-byte array, slope) with ``array * slope`` the stored intensities."""
    if is_ct:
        return np.round(np.clip(data, *CT_RANGE_HU) / CT_STEP_HU).astype(np.int8), CT_STEP_HU
    slope = max(float(np.max(data)), 1e-6) / 255.0
    return np.round(np.clip(data, 0.0, None) / slope).astype(np.uint8), slope


def compact_dataset(
    src: str, dst: str, margin_mm: float = 48.0, max_validation: int | None = None, compresslevel: int = 9
) -> dict:
    """Write the compact copy of ``src`` into ``dst`` and return its datalist (also ``dst/dataset.json``)."""
    import nibabel as nib
    from nibabel.openers import Opener

    from custom.data import load_training_datalist
    from custom.files import write_atomic, write_text_atomic
    from custom.prompts import mask_box

    Opener.default_compresslevel = int(compresslevel)
    source, target = Path(src), Path(dst)
    meta = json.loads((source / "dataset.json").read_text())
    is_ct = "CT" in json.dumps(meta.get("modality", "")).upper()
    copy = {k: v for k, v in meta.items() if k not in ("training", "validation", "test")}
    for folder in ("images", "labels"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for key in ("training", "validation"):
        if key not in meta:
            continue
        entries = load_training_datalist(source / "dataset.json", key)
        if key == "validation" and max_validation is not None:
            entries = entries[: int(max_validation)]
        copy[key] = []
        for entry in entries:
            image, label = nib.load(entry["image"]), nib.load(entry["label"])
            labels = np.asarray(label.dataobj)
            margin = np.ceil(margin_mm / np.asarray(image.header.get_zooms()[:3], dtype=float)).astype(int)
            box = mask_box(labels > 0, margin)
            if box is None:
                raise ValueError(f"{entry['label']}: no labelled voxel, nothing to crop around")
            crop = tuple(slice(a, b) for a, b in box)
            image, label = image.slicer[crop], label.slicer[crop]
            values, slope = quantise(np.asarray(image.dataobj, dtype=np.float32), is_ct)
            name = Path(entry["image"]).name
            for array, affine, folder, scale in (
                (values, image.affine, "images", slope),
                (np.asarray(label.dataobj).astype(np.uint8), label.affine, "labels", None),
            ):
                nifti = nib.Nifti1Image(array, affine)
                nifti.set_qform(affine, 1)
                nifti.set_sform(affine, 1)
                if scale is not None:
                    nifti.header.set_slope_inter(scale, 0.0)
                write_atomic(target / folder / name, lambda path, nifti=nifti: nib.save(nifti, path))
            copy[key].append({"image": f"images/{name}", "label": f"labels/{name}"})
    write_text_atomic(target / "dataset.json", json.dumps(copy, indent=1))
    return copy


if __name__ == "__main__":
    fire.Fire(compact_dataset)
