"""Careless or hostile input and faults: nothing lost, nothing silently wrong (one test per case)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import stat
import subprocess
import sys
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch
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
from monai.bundle import ConfigWorkflow

from custom.api import segment
from custom.cases import CaseError
from custom.data import CaseList
from custom.files import write_text_atomic
from custom.networks import build_sam_med3d, checkpoint_payload, load_weights

BUNDLE = REPO_ROOT / "bundle"


def _run_failing(tmp_path, network, **overrides) -> str:
    """Run inference expecting failures; return the run's failure message."""
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, network, **overrides)
    return str(root_cause(err.value))


def _blob_image(path, shape=(20, 22, 18), affine=None):
    image = np.full(shape, 10.0)
    image[5:15, 6:16, 4:14] = 100.0
    return write_nifti(path, image, np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else affine)


# 1. Two entries whose images share a file name get distinct outputs
def test_images_with_the_same_file_name_get_distinct_outputs(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _blob_image(tmp_path / folder / "ct.nii.gz")
    click = {"points": [[10, 11, 9]], "point_labels": [1]}
    datalist = [dict(click, image=f"{folder}/ct.nii.gz") for folder in ("a", "b")]
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    out = run_inference(tmp_path, ThresholdNetwork(), datalist=str(tmp_path / "list.json"))
    assert sorted(p.name for p in out.iterdir()) == ["a_ct", "b_ct"]
    for name, folder in (("a_ct", "a"), ("b_ct", "b")):
        _, _, report = read_output(out, name)
        assert report["image"].endswith(f"{folder}/ct.nii.gz")


# 2. Non-finite or constant images, non-finite weights, non-finite outputs: named errors, the rest runs
def test_nan_inf_and_constant_images_are_refused_by_name(tmp_path):
    nan = np.full((12, 12, 12), 50.0)
    nan[3, 4, 5] = np.nan
    inf = np.full((12, 12, 12), 50.0)
    inf[0, 0, 0] = np.inf
    cases = {
        "nan": write_nifti(tmp_path / "nan.nii.gz", nan, np.eye(4)),
        "inf": write_nifti(tmp_path / "inf.nii.gz", inf, np.eye(4)),
        "allnan": write_nifti(tmp_path / "allnan.nii.gz", np.full((8, 8, 8), np.nan), np.eye(4)),
        "zeros": write_nifti(tmp_path / "zeros.nii.gz", np.zeros((8, 8, 8)), np.eye(4)),
        "good": _blob_image(tmp_path / "good.nii.gz"),
    }
    datalist = [{"image": p, "points": [[4, 4, 4]], "point_labels": [1]} for p in cases.values()]
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    message = _run_failing(tmp_path, ThresholdNetwork(), datalist=str(tmp_path / "list.json"))
    assert "4 case(s) failed" in message
    assert "nan.nii.gz: 1 of 1,728 voxels are NaN or infinite" in message
    assert "inf.nii.gz: 1 of 1,728 voxels are NaN or infinite" in message
    assert "allnan.nii.gz: 512 of 512 voxels" in message
    assert "zeros.nii.gz: every voxel is 0.0: nothing to segment" in message
    assert (tmp_path / "out" / "good" / "good_seg.nii.gz").is_file()


def test_non_finite_weights_and_outputs_are_refused(tmp_path):
    network = build_sam_med3d("sam_med3d_tiny")
    broken = checkpoint_payload(network)
    broken["model"]["mask_decoder.iou_token.weight"] = torch.full_like(
        broken["model"]["mask_decoder.iou_token.weight"], float("nan")
    )
    torch.save(broken, tmp_path / "nan.pt")
    with pytest.raises(
        ValueError, match=r"nan.pt': 1 tensors hold NaN or infinite values \(e.g. mask_decoder.iou_token"
    ):
        load_weights(build_sam_med3d("sam_med3d_tiny"), tmp_path / "nan.pt")

    class NaNNetwork(ThresholdNetwork):
        def decode(self, embedding, point_coords, point_labels, mask_input=None):
            return torch.full_like(embedding, float("nan")), embedding.new_zeros(1, 1)

    good = _blob_image(tmp_path / "blob.nii.gz")
    message = _run_failing(
        tmp_path, NaNNetwork(), input_dict={"image": good, "points": [[10, 11, 9]], "point_labels": [1]}
    )
    assert "case 'blob': ValueError: the network returned NaN or infinite logits" in message
    assert not (tmp_path / "out" / "blob").exists()  # nothing written for a failed case


# 3. The single-object label is checked like every other
@pytest.mark.parametrize("label", [70000, "abc", -3, 2.7, True])
def test_bad_single_object_labels_are_named_and_the_rest_run(tmp_path, label):
    good, other = _blob_image(tmp_path / "good.nii.gz"), _blob_image(tmp_path / "other.nii.gz")
    click = {"points": [[10, 11, 9]], "point_labels": [1]}
    datalist = [dict(click, image=other, label=label), dict(click, image=good, label=7)]
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    message = _run_failing(tmp_path, ThresholdNetwork(), datalist=str(tmp_path / "list.json"))
    assert f"case 'other', object 0: 'label' must be an integer in 1..32767, got {label!r}" in message
    mask, _, _ = read_output(tmp_path / "out", "good")
    assert set(np.unique(mask)) == {0, 7}


# 4. A path with '..' names the case after the folder it means, inside output_dir
def test_dotdot_paths_stay_inside_the_output_folder(tmp_path):
    (tmp_path / "series" / "sub").mkdir(parents=True)
    _blob_image(tmp_path / "series" / "sub" / "img.nii.gz")
    cases = CaseList.prompted(
        input_dict={"image": str(tmp_path / "series" / "sub" / ".."), "points": [[1, 1, 1]], "point_labels": [1]}
    )
    assert cases.cases[0]["case"] == "series"
    nasty = CaseList.prompted(
        input_dict={"image": str(tmp_path / "series"), "case": "../../etc", "points": [[1, 1, 1]], "point_labels": [1]}
    )
    assert nasty.cases[0]["case"] == "_.._etc"  # one file-name component: no separator, no leading dot


# 5. Outputs get the umask's permissions; a killed writer's temporary file is cleaned up
def test_outputs_have_the_umask_permissions_and_stale_temporaries_go(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "report.json", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        out = run_inference(
            tmp_path,
            ThresholdNetwork(),
            input_dict={"image": _blob_image(tmp_path / "x.nii.gz"), "points": [[10, 11, 9]], "point_labels": [1]},
        )
        for written in (out / "x").iterdir():
            assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
    finally:
        os.umask(previous)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".report.json.{dead.stdout.strip()}.abc123.tmp.json"
    stale.write_text("half")
    mine = tmp_path / f".report.json.{os.getpid()}.keep.tmp.json"  # a live writer's file stays
    mine.write_text("busy")
    write_text_atomic(tmp_path / "report.json", "{}")
    assert not stale.exists() and mine.exists()


# 6. A one-slice volume keeps its 3D shape (and is segmented)
def test_a_one_slice_volume_stays_3d(tmp_path):
    image = np.full((30, 28, 1), 10.0)
    image[8:20, 5:20, 0] = 100.0
    path = write_nifti(tmp_path / "thin.nii.gz", image, np.diag([1.0, 1.0, 3.0, 1.0]))
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": path, "points": [[12, 10, 0]], "point_labels": [1]}
    )
    mask, _, _ = read_output(out, "thin")
    assert mask.shape == (30, 28, 1)
    assert boundary_tolerant_equal(mask[..., 0] > 0, image[..., 0] > 50)  # resampled 1 mm -> 1.5 mm and back


# 7. An unwritable output folder is found before any work
def test_an_unwritable_output_folder_is_found_first(tmp_path):
    network = ThresholdNetwork()
    entry = {"image": _blob_image(tmp_path / "x.nii.gz"), "points": [[1, 1, 1]], "point_labels": [1]}
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, network, input_dict=entry, output_dir="/proc/sam_med3d_out")  # even for root
    cause = root_cause(err.value)
    assert isinstance(cause, PermissionError) and "'/proc/sam_med3d_out' is not writable" in str(cause)
    assert network.encoded == 0


def test_a_file_where_the_output_folder_should_be_is_found_first(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    network = ThresholdNetwork()
    with pytest.raises(RuntimeError) as err:
        run_inference(
            tmp_path,
            network,
            input_dict={"image": _blob_image(tmp_path / "x.nii.gz"), "points": [[1, 1, 1]], "point_labels": [1]},
        )
    assert "out' is not writable" in str(root_cause(err.value)) and network.encoded == 0


# 8. The output header is the input's, also for a singular sform
def test_the_output_header_is_the_inputs_even_with_a_singular_sform(tmp_path):
    image = np.full((20, 22, 18), 10.0, np.float32)
    image[5:15, 6:16, 4:14] = 100.0
    volume = nib.Nifti1Image(image, np.diag([1.5, 1.5, 1.5, 1.0]))
    qform = np.diag([1.5, 1.5, 1.5, 1.0])
    qform[:3, 3] = [-10.0, 4.0, 2.0]
    singular = np.diag([1.5, 1.5, 0.0, 1.0])
    volume.header.set_qform(qform, code=1)
    volume.header.set_sform(singular, code=2)
    path = tmp_path / "odd.nii.gz"
    nib.save(volume, path)
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": str(path), "points": [[10, 11, 9]], "point_labels": [1]}
    )
    written, source = nib.load(out / "odd" / "odd_seg.nii.gz"), nib.load(path)
    for field in (
        "sform_code",
        "qform_code",
        "pixdim",
        "srow_x",
        "srow_y",
        "srow_z",
        "quatern_b",
        "qoffset_x",
        "xyzt_units",
    ):
        np.testing.assert_array_equal(written.header[field], source.header[field], err_msg=field)
    np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, image > 50)
    assert written.get_data_dtype() == np.int16


# 9. A safe entry: values never pass through MONAI's expression parser
def test_the_safe_entry_takes_file_names_as_they_are(tmp_path):
    weird = tmp_path / "$__import__('os').getcwd().nii.gz"
    _blob_image(weird)
    ckpt = tmp_path / "tiny.pt"
    torch.save(checkpoint_payload(build_sam_med3d("sam_med3d_tiny")), ckpt)
    written = segment(
        weird,
        [[10, 11, 9]],
        [1],
        bundle_root=BUNDLE,
        output_dir=tmp_path / "@out",
        network_name="sam_med3d_tiny",
        ckpt_path=ckpt,
    )
    assert written.is_file() and written.parent.parent == tmp_path / "@out"
    assert nib.load(written).shape == (20, 22, 18)
    # and through the fire CLI
    result = subprocess.run(
        [
            sys.executable,
            str(BUNDLE / "scripts/segment.py"),
            "--image",
            str(weird),
            "--points",
            "[[10, 11, 9]]",
            "--point_labels",
            "[1]",
            "--output_dir",
            str(tmp_path / "cli"),
            "--network_name",
            "sam_med3d_tiny",
            "--ckpt_path",
            str(ckpt),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cli").is_dir() and list((tmp_path / "cli").rglob("*_seg.nii.gz"))


# 10. Checkpoint files that are empty, or folders, say so
def test_empty_and_folder_checkpoints_say_what_they_are(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt' is empty \(0 bytes\)"):
        load_weights(build_sam_med3d("sam_med3d_tiny"), tmp_path / "empty.pt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_weights(build_sam_med3d("sam_med3d_tiny"), tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(ValueError, match=r"junk.pt' \(10 bytes\) could not be read as a PyTorch file: \S"):
        load_weights(build_sam_med3d("sam_med3d_tiny"), tmp_path / "junk.pt")


def test_lowercase_true_and_false_from_the_command_line_mean_what_they_say(tmp_path):
    # `python -m monai.bundle run ... --freeze_image_encoder false` delivers the string "false" (truthy)
    from monai.bundle import ConfigParser

    from custom.checkpoints import check_run_folder

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundle" / "configs" / "train.json"))
    parser["bundle_root"] = str(REPO_ROOT / "bundle")
    parser["freeze_image_encoder"] = "false"
    parser["network_def#box_prompts"] = "false"
    network = parser.get_parsed_content("network")
    encoder = [p.requires_grad for n, p in network.named_parameters() if n.startswith("image_encoder.")]
    assert encoder and all(encoder)
    assert not network.prompt_encoder.box_prompts
    parser["freeze_image_encoder"] = "True"
    network = parser.get_parsed_content("network", lazy=False)
    assert not any(p.requires_grad for n, p in network.named_parameters() if n.startswith("image_encoder."))

    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--resume True"):
        check_run_folder(tmp_path, "false")
    with pytest.raises(ValueError, match="resume must be True or False, got 'no'"):
        check_run_folder(tmp_path, "no")
    with pytest.raises(ValueError, match="box_prompts must be True or False, got 'yes'"):
        build_sam_med3d("sam_med3d_tiny", box_prompts="yes")
    assert build_sam_med3d("sam_med3d_tiny", box_prompts="TRUE").prompt_encoder.box_prompts


# ------------------------------------------------------------------------------------------------------ round two
# Each test below is one case of issue 24 ("Hostile input, round two"), in the order.


def _dataset_json(folder, entries, key="validation"):
    """An MSD-style dataset.json in ``folder`` listing ``entries``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {"0": "background", "1": "one", "2": "two"}
    (folder / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": labels, key: entries}))
    return folder


def _labelled_case(folder, name, label, image=None, affine=None, label_dtype=np.uint8):
    """Write ``<name>_img.nii.gz`` (bright where labelled, unless ``image`` is given) and ``<name>_lab.nii.gz``."""
    affine = np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else affine
    write_nifti(folder / f"{name}_img.nii.gz", np.where(label > 0, 100.0, 10.0) if image is None else image, affine)
    nib.Nifti1Image(np.asarray(label, label_dtype), affine).to_filename(folder / f"{name}_lab.nii.gz")
    return {"image": f"./{name}_img.nii.gz", "label": f"./{name}_lab.nii.gz"}


def _evaluate_folder(tmp_path, dataset, network, **overrides):
    """evaluate.json on ``dataset/dataset.json`` into ``tmp_path/eval`` (3 clicks, 32^3 windows, raw intensities,
    unless ``overrides`` say otherwise); returns (summary, rows, the run's failure message or None)."""
    settings = {"num_clicks": 3, "predictor#roi_size": 32, "predictor#intensity_normalization": None}
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "evaluate.json"),
        workflow_type="infer",
        dataset_dir=str(dataset),
        datalist=str(dataset / "dataset.json"),
        output_dir=str(tmp_path / "eval"),
        network=network,
        **{**settings, "report#progress": False, **overrides},
    )
    workflow.initialize()
    failure = None
    try:
        workflow.run()
    except RuntimeError as err:
        failure = str(root_cause(err))
    finally:
        workflow.finalize()
    out = tmp_path / "eval"
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return json.loads((out / "summary.json").read_text()), rows, failure


def _raw_nifti(path, header, payload=b"", members=()):
    """A NIfTI file written byte by byte (nibabel's writer would repair the header): the header, then ``payload``;
    a ``.nii.gz`` gets the header and payload as one gzip member and ``members`` (raw bytes) appended after it."""
    header["vox_offset"] = 352
    data = header.binaryblock + b"\0" * 4 + payload
    if str(path).endswith(".gz"):
        data = gzip.compress(data) + b"".join(members)
    path.write_bytes(data)
    return str(path)


def _header(shape, dtype=np.float32, zooms=(1.5, 1.5, 1.5)):
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms(zooms)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    header.set_qform(np.diag([*zooms, 1.0]), code=1)
    return header


# 1. A challenge .npz cannot run code: its object arrays are not unpickled beyond plain data
class _Payload:
    """Unpickling this runs ``touch <marker>``, as a hostile ``.npz`` would run anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_npz_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    np.savez(tmp_path / "evil_imgs.npz", imgs=evil, gts=np.zeros((4, 4, 4), np.uint8))
    gts = np.zeros((12, 14, 16), np.uint8)
    gts[3:9, 4:10, 5:12] = 1
    boxes = np.empty(2, dtype=object)
    boxes[0], boxes[1] = {"z_min": 3}, _Payload(marker)
    np.savez(tmp_path / "evil_boxes.npz", imgs=np.where(gts > 0, 200, 20).astype(np.uint8), gts=gts, boxes=boxes)
    good_boxes = np.array([{"z_min": 3, "z_max": 8, "z_mid": 5, "z_mid_x_min": 5, "z_mid_y_min": 4,
                            "z_mid_x_max": 11, "z_mid_y_max": 9}], dtype=object)  # fmt: skip
    np.savez(tmp_path / "good.npz", imgs=np.where(gts > 0, 200, 20).astype(np.uint8), gts=gts, boxes=good_boxes)
    entries = [{"image": f"./{name}.npz"} for name in ("evil_imgs", "evil_boxes", "good")]
    summary, rows, failure = _evaluate_folder(
        tmp_path, _dataset_json(tmp_path, entries), ThresholdNetwork(), protocol="cvpr25", num_clicks=1
    )
    assert not marker.exists()  # neither payload ran, while the datalist was checked or while loading
    assert "evil_imgs.npz: 'imgs' holds Python objects (object), which are not loaded" in failure
    assert "evil_boxes.npz: 'boxes' holds Python objects that are not loaded" in failure
    assert "posix.system is not data" in failure or "os.system is not data" in failure
    assert {r["case"] for r in rows} == {"good.npz"} and summary["cvpr25"]["overall"]["cases"] == 1


# 2. Generated names never collide with names that exist already
def test_generated_case_names_never_overwrite_each_other(tmp_path):
    _blob_image(tmp_path / "ct.nii.gz")
    _blob_image(tmp_path / "ct_2.nii.gz")
    click = {"points": [[10, 11, 9]], "point_labels": [1]}
    datalist = [dict(click, image="ct.nii.gz", label=1), dict(click, image="ct.nii.gz", label=2),
                dict(click, image="ct_2.nii.gz", label=7)]  # fmt: skip
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    out = run_inference(tmp_path, ThresholdNetwork(), datalist=str(tmp_path / "list.json"))
    assert sorted(p.name for p in out.iterdir()) == ["ct", "ct_2", "ct_3"]
    for case, label in (("ct", 1), ("ct_3", 2), ("ct_2", 7)):  # each mask is its own entry's
        mask, _, report = read_output(out, case)
        assert set(np.unique(mask)) == {0, label}, case
        assert report["objects"][0]["label"] == label


# 3. A resumed evaluation gives the numbers an uninterrupted one gives
class _CentreNetwork(ThresholdNetwork):
    """``intensity > 50`` only in the central half of its window: where a window sits changes the mask."""

    def decode(self, embedding, point_coords, point_labels, mask_input=None):
        quarter = embedding.shape[-1] // 4
        centre = torch.zeros_like(embedding, dtype=torch.bool)
        centre[..., quarter:-quarter, quarter:-quarter, quarter:-quarter] = True
        return (embedding - 50.0).masked_fill(~centre, -10.0), embedding.new_zeros(embedding.shape[0], 1)


def test_a_resumed_evaluation_gives_the_uninterrupted_numbers(tmp_path):
    # class 2 lies next to class 1: its first click falls well inside class 1's window, whose embedding it reuses
    # when class 1 ran before it; a bright slab makes the mask depend on where that window sits
    label = np.zeros((48, 24, 24), np.uint8)
    label[18:25, 8:16, 8:16] = 1
    label[25:32, 8:16, 8:16] = 2
    image = np.full(label.shape, 10.0)
    image[:25, 4:20, 4:20] = 100.0
    image[label > 0] = 100.0
    dataset = tmp_path / "data"
    dataset.mkdir()
    entries = [_labelled_case(dataset, "pair", label, image)]
    entries.append(_labelled_case(dataset, "other", np.roll(label, 3, axis=1), np.roll(image, 3, axis=1)))
    _dataset_json(dataset, entries)
    settings = {"predictor#roi_size": 64}
    summary, rows, _ = _evaluate_folder(tmp_path, dataset, _CentreNetwork(), **settings)
    assert len(rows) == 2 * 2 * 3
    # interrupted after the first target: metrics.csv holds its rows only
    metrics = tmp_path / "eval" / "metrics.csv"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:4]))
    network = _CentreNetwork()
    resumed_summary, resumed, _ = _evaluate_folder(tmp_path, dataset, network, **settings)

    def scores(table):
        return sorted((r["case"], r["class"], r["click"], r["point"], r["dice"], r["nsd"]) for r in table)

    assert scores(resumed) == scores(rows)
    assert resumed_summary["overall"] == summary["overall"] and resumed_summary["per_class"] == summary["per_class"]


# 4. A label map stored as floats must hold whole numbers
def test_non_integer_label_values_are_refused_by_file_and_value(tmp_path):
    dataset = tmp_path / "data"
    dataset.mkdir()
    label = np.zeros((20, 22, 18), np.float32)
    label[4:10, 5:12, 4:9] = 1.0
    label[11:16, 5:12, 10:15] = 1.5  # class 2, stored carelessly
    floats = _labelled_case(dataset, "floats", label, label_dtype=np.float32)
    good = _labelled_case(dataset, "good", np.where(label > 0, 1, 0))
    summary, rows, failure = _evaluate_folder(tmp_path, _dataset_json(dataset, [floats, good]), ThresholdNetwork())
    assert "floats_lab.nii.gz: label values must be whole numbers (class values), found 1.5" in failure
    assert {r["case"] for r in rows} == {"good_img"} and summary["overall"]["targets"] == 1


# 5. A voxel size of 0 is refused, naming the file and the axis
def test_a_zero_voxel_size_is_refused_by_file_and_axis(tmp_path):
    image = np.full((20, 22, 18), 10.0, np.float32)
    image[5:15, 6:16, 4:14] = 100.0
    header = _header(image.shape)
    header.set_sform(None, code=0)  # the geometry comes from the qform, which scales by pixdim
    header["pixdim"][2] = 0.0
    zero = _raw_nifti(tmp_path / "zero.nii.gz", header, image.tobytes(order="F"))
    click = {"points": [[10, 11, 9]], "point_labels": [1]}
    message = _run_failing(tmp_path, ThresholdNetwork(), input_dict=dict(click, image=zero))
    assert "zero.nii.gz: the voxel size along array axis 1 is 0.0 (pixdim[2] in the header" in message
    assert not (tmp_path / "out" / "zero").exists()
    # with a usable sform the zero pixdim plays no part: the scan is read as before
    header.set_sform(np.diag([1.5, 1.5, 1.5, 1.0]), code=1)
    fine = _raw_nifti(tmp_path / "fine.nii.gz", header, image.tobytes(order="F"))
    out = run_inference(tmp_path / "b", ThresholdNetwork(), input_dict=dict(click, image=fine))
    mask, affine, _ = read_output(out, "fine")
    np.testing.assert_array_equal(mask > 0, image > 50)
    np.testing.assert_allclose(affine, np.diag([1.5, 1.5, 1.5, 1.0]))


# 6. A DICOM series with a missing slice is refused (ITK would space the slices evenly)
def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    volume = dicom_volume()
    write_dicom_series(tmp_path / "gap", volume, skip=(5,))
    click = {"points": [[8, 8, 4]], "point_labels": [1]}
    message = _run_failing(tmp_path, ThresholdNetwork(), input_dict=dict(click, image=str(tmp_path / "gap")))
    assert "gap: series " in message and "slices are not evenly spaced: 6 mm between slice 4 and 5" in message
    assert "where the others are 3 mm apart (a missing slice?)" in message and "misplaced by up to 1.5 mm" in message
    # the complete series is read on its true grid
    write_dicom_series(tmp_path / "whole", volume)
    out = run_inference(tmp_path / "b", ThresholdNetwork(), input_dict=dict(click, image=str(tmp_path / "whole")))
    mask, affine, _ = read_output(out, "whole")
    np.testing.assert_allclose(np.abs(np.diag(affine))[:3], [1.5, 1.5, 3.0], atol=1e-6)
    assert boundary_tolerant_equal(mask > 0, volume.transpose(2, 1, 0) > 50)


# 7. A folder of several DICOM series: refused with their UIDs, or the one named by series_uid, said in the report
def test_a_folder_of_several_dicom_series_needs_a_series_uid(tmp_path):
    folder = tmp_path / "study"
    first = write_dicom_series(folder, dicom_volume(12), description="first", prefix="a")
    second = write_dicom_series(folder, dicom_volume(10), description="second", prefix="b")
    click = {"points": [[8, 8, 4]], "point_labels": [1]}
    message = _run_failing(tmp_path, ThresholdNetwork(), input_dict=dict(click, image=str(folder)))
    assert "study: the folder holds 2 DICOM series; give the entry's 'series_uid', one of: " in message
    assert f"{first} (12 files, CT, 'first')" in message and f"{second} (10 files, CT, 'second')" in message
    out = run_inference(
        tmp_path / "b", ThresholdNetwork(), input_dict=dict(click, image=str(folder), series_uid=second)
    )
    mask, _, report = read_output(out, "study")
    assert mask.shape == (18, 16, 10)  # the second series, x, y, z
    assert report["dicom_series_uid"] == second and report["dicom_series_description"] == "second"
    wrong = _run_failing(
        tmp_path / "c", ThresholdNetwork(), input_dict=dict(click, image=str(folder), series_uid="1.2")
    )
    assert "study: no DICOM series '1.2' in this folder; it holds: " in wrong


# 8. A case folder inside output_dir that links elsewhere takes no write out of output_dir
def test_a_symlinked_case_folder_cannot_carry_writes_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "blob").symlink_to(outside, target_is_directory=True)
    entry = {"image": _blob_image(tmp_path / "blob.nii.gz"), "points": [[10, 11, 9]], "point_labels": [1]}
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, ThresholdNetwork(), input_dict=entry)
    cause = root_cause(err.value)
    assert isinstance(cause, CaseError)
    assert f"{str(tmp_path / 'out' / 'blob')!r} leads to {str(outside)!r}, outside the output folder" in str(cause)
    assert list(outside.iterdir()) == []
    # nor does a metrics file that is a link
    from custom.files import append_line_durably

    (tmp_path / "out" / "metrics.csv").symlink_to(outside / "metrics.csv")
    with pytest.raises(OSError, match="metrics.csv' is a link, which is not followed"):
        append_line_durably(tmp_path / "out" / "metrics.csv", "a,b\n")
    assert list(outside.iterdir()) == []


# 9. A gzip bomb is refused from its header, before a voxel is decompressed
def test_a_gzip_bomb_is_refused_before_its_voxels_are_read(tmp_path):
    from custom.predictor import VolumetricPredictor

    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip member of 64 MiB of zeros, 64 KiB on disk
    member = zeros.compress(bytes(64 << 20)) + zeros.flush()
    # declares 1024^3 voxels; after one member of zeros the stream is broken: reading voxels would fail loudly
    bomb = _raw_nifti(
        tmp_path / "bomb.nii.gz", _header((1024,) * 3, np.uint8, (1.0, 1.0, 1.0)), members=[member, b"not gzip"]
    )
    assert os.path.getsize(bomb) < 200_000
    click = {"points": [[10, 10, 10]], "point_labels": [1]}
    message = _run_failing(tmp_path, ThresholdNetwork(), input_dict=dict(click, image=bomb))
    assert "bomb.nii.gz: the header declares 1024 x 1024 x 1024 voxels of uint8 (1,073,741,824 voxels" in message
    assert "(683, 683, 683) network grid" in message and "above max_grid_voxels=268,435,456" in message
    with pytest.raises(ValueError, match="the header declares 1024 x 1024 x 1024 voxels"):
        VolumetricPredictor(ThresholdNetwork()).set_image(bomb)


# 10. A header declaring a huge shape says the declared size and the file's size
@pytest.mark.parametrize("suffix", [".nii", ".mha"])
def test_a_huge_declared_shape_names_its_size_and_the_files(tmp_path, suffix):
    path = tmp_path / f"huge{suffix}"
    if suffix == ".nii":
        _raw_nifti(path, _header((30000,) * 3))
    else:
        path.write_text(
            "ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\nElementSpacing = 1.5 1.5 1.5\n"
            "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
        )
    size = os.path.getsize(path)
    message = _run_failing(
        tmp_path, ThresholdNetwork(), input_dict={"image": str(path), "points": [[1, 1, 1]], "point_labels": [1]}
    )
    assert f"huge{suffix}: the header declares 30000 x 30000 x 30000 voxels of float" in message
    assert f"(27,000,000,000,000 voxels, 100,582.8 GiB as float32) in {size:,} bytes of file" in message


# 11. Clicks per object are capped, by name
def test_clicks_per_object_are_capped_by_name(tmp_path):
    image = _blob_image(tmp_path / "blob.nii.gz")
    points = [[10, 11, 9]] * 101
    entry = {"image": image, "points": points, "point_labels": [1] * 101}
    message = _run_failing(tmp_path, ThresholdNetwork(), input_dict=entry)
    assert "case 'blob', object label 1: 101 clicks, more than max_clicks_per_object=100" in message
    out = run_inference(tmp_path / "b", ThresholdNetwork(), input_dict=entry, max_clicks_per_object=101)
    _, _, report = read_output(out, "blob")
    assert report["objects"][0]["clicks"] == 101


# 12. An evaluation entry listed twice is counted once, with a warning
def test_a_repeated_evaluation_entry_is_counted_once(tmp_path):
    dataset = tmp_path / "data"
    dataset.mkdir()
    label = np.zeros((20, 22, 18), np.uint8)
    label[4:12, 5:14, 4:12] = 1
    entry = _labelled_case(dataset, "case", label)
    other = _labelled_case(dataset, "other", np.roll(label, 4, axis=0))
    summary, rows, failure = _evaluate_folder(
        tmp_path, _dataset_json(dataset, [entry, other, dict(entry)]), ThresholdNetwork()
    )
    assert failure is None and summary["overall"]["targets"] == 2
    assert {r["case"] for r in rows} == {"case_img", "other_img"}
    assert len(summary["warnings"]) == 1 and "entry 2 of 'validation' repeats entry 0" in summary["warnings"][0]


# 13. Resume and save errors name the file and the safe next step
def test_resume_and_save_errors_name_the_file_and_the_safe_next_step(tmp_path):
    import argparse

    from ignite.engine import Engine

    from custom.checkpoints import ResumeTrainingState
    from custom.files import write_atomic

    def resume(path):
        engine = Engine(lambda engine, batch: None)
        ResumeTrainingState(load_path=str(path), load_dict={"network": torch.nn.Linear(2, 2)}).attach(engine)
        with pytest.raises(ValueError) as err:
            engine.run([0], max_epochs=1)
        return str(err.value)

    state = tmp_path / "run" / "training_state.pt"
    state.parent.mkdir()
    torch.save({"network": torch.nn.Linear(2, 2).state_dict()}, state)
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    message = resume(state)
    assert f"{str(state)!r} ({state.stat().st_size:,} bytes) is damaged (truncated, or not a PyTorch file" in message
    assert "start a new run in another --output_dir, with --pretrained_ckpt" in message and "model_latest.pt" in message
    torch.save({"network": torch.nn.Linear(2, 2).state_dict(), "extra": argparse.Namespace(a=1)}, state)
    message = resume(state)
    assert f"{str(state)!r} holds pickled Python objects, which are not loaded" in message
    assert "do not load it with weights_only=False" in message
    # a full disk: the file it could not write, and that the earlier one is intact
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to stand for a full disk")

    def onto_a_full_disk(tmp):
        os.unlink(tmp)
        os.symlink("/dev/full", tmp)
        return tmp

    with pytest.raises(RuntimeError, match=r"could not write '.*training_state.pt' \(the earlier file is unchanged"):
        write_atomic(state, lambda tmp: torch.save({"x": torch.zeros(1000)}, onto_a_full_disk(tmp)))
    with pytest.raises(OSError, match=r"No space left on device: could not write '.*report.json' \(nothing was"):
        write_atomic(tmp_path / "run" / "report.json", lambda tmp: open(onto_a_full_disk(tmp), "w").write("x" * 10**5))
    assert state.is_file() and not (tmp_path / "run" / "report.json").exists()


# Also seen: an RGB NIfTI
def test_an_rgb_nifti_is_refused_as_rgb(tmp_path):
    rgb = np.zeros((12, 12, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.Nifti1Image(rgb, np.eye(4)).to_filename(tmp_path / "photo.nii.gz")
    entry = {"image": str(tmp_path / "photo.nii.gz"), "points": [[5, 5, 5]], "point_labels": [1]}
    message = _run_failing(tmp_path, ThresholdNetwork(), input_dict=entry)
    assert "photo.nii.gz: RGB images are not supported (NIfTI datatype 128" in message
    assert "expected a single-channel 3D scan" in message


# Also seen: NRRD spaces without anatomical directions are said in the report, unknown ones refused
def test_nrrd_spaces_are_reported_or_refused(tmp_path):
    import itk

    volume = np.where(np.random.default_rng(1).random((12, 14, 16)) > 0.6, 100.0, 10.0).astype(np.float32)
    image = itk.image_from_array(volume)
    image.SetSpacing([1.5, 1.5, 1.5])
    itk.imwrite(image, str(tmp_path / "lps.nrrd"))
    header, data = (tmp_path / "lps.nrrd").read_bytes().split(b"\n\n", 1)
    assert b"space: left-posterior-superior" in header

    def with_space(name, space):
        (tmp_path / f"{name}.nrrd").write_bytes(header.replace(b"left-posterior-superior", space) + b"\n\n" + data)
        return {"image": str(tmp_path / f"{name}.nrrd"), "points": [[3, 4, 5]], "point_labels": [1]}

    reference = run_inference(
        tmp_path / "a", ThresholdNetwork(), input_dict=with_space("lps", b"left-posterior-superior")
    )
    scanner = run_inference(tmp_path / "b", ThresholdNetwork(), input_dict=with_space("scanner", b"scanner-xyz"))
    lps_mask, lps_affine, lps_report = read_output(reference, "lps")
    mask, affine, report = read_output(scanner, "scanner")
    assert "geometry_assumed" not in lps_report
    assert report["geometry_assumed"].startswith("NRRD space 'scanner-xyz' names no anatomical directions: its axes")
    np.testing.assert_array_equal(mask, lps_mask)
    np.testing.assert_allclose(affine, lps_affine)
    message = _run_failing(tmp_path / "c", ThresholdNetwork(), input_dict=with_space("left", b"3D-left-handed"))
    assert "left.nrrd: NRRD space '3d-left-handed' is not supported: expected one of right-anterior-superior" in message


# Also seen: where a click lies is decided by a stated rule (voxel i spans i - 0.5 .. i + 0.5)
def test_the_rule_for_points_at_the_border_is_stated(tmp_path):
    image = _blob_image(tmp_path / "edge.nii.gz")
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": image, "points": [[-0.4, 11, 9]], "point_labels": [1]}
    )
    _, _, report = read_output(out, "edge")
    assert report["objects"][0]["points"] == [[-0.4, 11, 9]]
    message = _run_failing(
        tmp_path / "b", ThresholdNetwork(), input_dict={"image": image, "points": [[-0.6, 11, 9]], "point_labels": [1]}
    )
    assert (
        "point [-0.6, 11.0, 9.0] (voxels) is outside the image (voxel [-0.6, 11.0, 9.0], image shape [20, 22, 18])"
        in message
    )
    assert "each voxel index must lie in -0.5 .. n - 0.5, voxel i spanning i - 0.5 to i + 0.5" in message
