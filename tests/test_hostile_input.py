"""Careless or hostile input and faults: nothing lost, nothing silently wrong (one test per case)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from test_inference import ThresholdNetwork, boundary_tolerant_equal, read_output, run_inference, write_nifti

from custom.api import segment
from custom.data import CaseList
from custom.files import write_text_atomic
from custom.networks import build_sam_med3d, checkpoint_payload, load_checkpoint

BUNDLE = REPO_ROOT / "bundle"


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _run_failing(tmp_path, network, **overrides) -> str:
    """Run inference expecting failures; return the run's failure message."""
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, network, **overrides)
    return str(_root_cause(err.value))


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
        load_checkpoint(build_sam_med3d("sam_med3d_tiny"), tmp_path / "nan.pt")

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
    cases = CaseList(
        input_dict={"image": str(tmp_path / "series" / "sub" / ".."), "points": [[1, 1, 1]], "point_labels": [1]}
    )
    assert cases.cases[0]["case"] == "series"
    nasty = CaseList(
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
    cause = _root_cause(err.value)
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
    assert "out' is not writable" in str(_root_cause(err.value)) and network.encoded == 0


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
        load_checkpoint(build_sam_med3d("sam_med3d_tiny"), tmp_path / "empty.pt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_checkpoint(build_sam_med3d("sam_med3d_tiny"), tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(ValueError, match=r"junk.pt' \(10 bytes\) could not be read as a PyTorch file: \S"):
        load_checkpoint(build_sam_med3d("sam_med3d_tiny"), tmp_path / "junk.pt")


def test_lowercase_true_and_false_from_the_command_line_mean_what_they_say(tmp_path):
    # `python -m monai.bundle run ... --freeze_image_encoder false` delivers the string "false" (truthy)
    from monai.bundle import ConfigParser

    from custom.engines import check_run_folder

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
