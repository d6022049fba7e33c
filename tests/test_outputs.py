"""Output formats (``output_ext``: NIfTI, NRRD, DICOM-SEG) and the preview PNG, through the real inference config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import (
    REPO_ROOT,
    ThresholdNetwork,
    boundary_tolerant_equal,
    dicom_volume,
    read_output,
    root_cause,
    run_inference,
    write_dicom_series,
    write_nifti,
)

from custom.io import load_volume
from custom.labels import LabelTable
from custom.preview import preview_size

LABELS = LabelTable.load(REPO_ROOT / "bundle" / "docs" / "labels.json")


def _source_slices(folder):
    import pydicom

    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in sorted(folder.iterdir()))}


def test_dicom_seg_lands_on_the_source_series(tmp_path):
    hd = pytest.importorskip("highdicom")
    volume = dicom_volume(12)  # z, y, x; the object is not square in-plane, so a transposed frame shows
    series = write_dicom_series(tmp_path / "series", volume)
    entry = {"image": str(tmp_path / "series"), "points": [[8, 8, 4]], "point_labels": [1]}
    out = run_inference(tmp_path / "dcm", ThresholdNetwork(), input_dict=entry, output_ext=".dcm", preview=False)
    nifti = run_inference(tmp_path / "nii", ThresholdNetwork(), input_dict=entry, preview=False)
    mask, _, _ = read_output(nifti, "series")  # x, y, z
    assert mask.any()
    report = json.loads((out / "series" / "series_seg.json").read_text())
    assert report["segmentation"] == str(out / "series" / "series_seg.dcm")

    seg = hd.seg.segread(str(out / "series" / "series_seg.dcm"))
    sources = _source_slices(tmp_path / "series")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    first = next(iter(sources.values()))
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    referenced = {
        str(item.ReferencedSOPInstanceUID) for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == set(sources)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in first.PixelSpacing]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [float(v) for v in first.ImageOrientationPatient]
    (description,) = seg.SegmentSequence
    assert description.SegmentLabel == LABELS[1].name and len(description.RecommendedDisplayCIELabValue) == 3

    # each frame: on one source slice, at its position, holding the NIfTI output's voxels of that slice
    frames, covered = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns), set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source = sources[uid]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == [float(v) for v in source.ImagePositionPatient]
        k = int(source.InstanceNumber) - 1  # the helper's slice k lies at z = 3k mm: array index k
        identification = item if "SegmentIdentificationSequence" in item else shared  # newer highdicom: shared
        assert identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
        np.testing.assert_array_equal(frame, mask[:, :, k].T > 0)  # frame rows: y, columns: x
        covered.add(k)
    assert covered == {k for k in range(mask.shape[2]) if mask[:, :, k].any()}  # no slice with voxels left out


def test_dcm_output_is_refused_for_an_image_that_is_not_a_dicom_series(tmp_path):
    image = np.full((16, 16, 12), 10.0)
    image[4:12, 4:12, 3:9] = 100.0
    entry = {"image": write_nifti(tmp_path / "ct.nii.gz", image, np.eye(4)), "points": [[8, 8, 5]], "point_labels": [1]}
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, ThresholdNetwork(), input_dict=entry, output_ext=".dcm")
    message = str(root_cause(err.value))
    assert "case 'ct': output_ext '.dcm' writes a DICOM-SEG" in message
    assert "the entry's 'image' must be a DICOM series folder" in message and "ct.nii.gz" in message
    assert not (tmp_path / "out" / "ct").exists()
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, ThresholdNetwork(), input_dict=entry, output_ext=".png")
    assert "output_ext must be one of '.nii.gz', '.nrrd', '.dcm', got '.png'" in str(root_cause(err.value))


def test_nrrd_output_round_trips_shape_and_space(tmp_path):
    image = np.full((20, 16, 12), 10.0)
    image[5:15, 4:12, 3:9] = 100.0
    affine = np.array([[0.0, 0.0, -2.0, 30.0], [1.2, 0.0, 0.0, -20.0], [0.0, -0.9, 0.0, 15.0], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "vol.nii.gz", image, affine)
    entry = {"image": path, "points": [[10, 8, 6]], "point_labels": [1]}
    out = run_inference(tmp_path, ThresholdNetwork(), input_dict=entry, output_ext=".nrrd", preview=False)
    written = out / "vol" / "vol_seg.nrrd"
    assert b"space: left-posterior-superior" in written.read_bytes()[:1000]
    seg, source = load_volume(written, dtype=None), load_volume(path)
    assert seg.shape == source.shape == (1, 20, 16, 12)
    np.testing.assert_allclose(seg.affine.numpy(), source.affine.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(source.affine), affine, atol=1e-5)
    nifti = run_inference(tmp_path / "nii", ThresholdNetwork(), input_dict=entry, preview=False)
    np.testing.assert_array_equal(seg.numpy()[0], read_output(nifti, "vol")[0])  # the same voxels as the NIfTI
    assert boundary_tolerant_equal(seg.numpy()[0] > 0, image > 50)


def _colour_present(picture: np.ndarray, rgb) -> bool:
    return bool(np.all(picture[..., :3] == np.asarray(rgb, np.uint8), axis=-1).any())


def test_preview_png_beside_the_output_in_label_colours(tmp_path):
    from PIL import Image

    image = np.full((40, 24, 16), 10.0)
    image[4:14, 6:18, 4:12] = 100.0
    image[26:36, 6:18, 4:12] = 100.0
    objects = [
        {"label": 1, "points": [[9, 12, 8]], "point_labels": [1]},
        {"label": 3, "points": [[31, 12, 8], [9, 12, 8]], "point_labels": [1, 0]},
    ]
    entry = {"image": write_nifti(tmp_path / "ct.nii.gz", image, np.diag([1.5, 1.5, 2.0, 1.0])), "objects": objects}
    out = run_inference(tmp_path, ThresholdNetwork(), input_dict=entry)
    png = out / "ct" / "ct_seg.png"
    _, _, report = read_output(out, "ct")
    assert report["preview"] == str(png)
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert (picture.shape[1], picture.shape[0]) == preview_size(2)
    for value in (1, 3):
        assert _colour_present(picture, LABELS[value].color), LABELS[value]
    assert not _colour_present(picture, LABELS[2].color)
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    quiet = run_inference(tmp_path / "b", ThresholdNetwork(), input_dict=entry, preview=False)
    assert sorted(p.name for p in (quiet / "ct").iterdir()) == ["ct_seg.json", "ct_seg.nii.gz"]
    assert "preview" not in read_output(quiet, "ct")[2]
