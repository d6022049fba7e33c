"""The inference workflow: geometry of crop / resampling / paste-back, window growth, inputs and errors.

Most tests swap in ``ThresholdNetwork``, whose prediction is known (intensity above 50, at full
resolution), so that every voxel of the output can be checked against the input.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import (
    CONFIGS,
    REPO_ROOT,
    ThresholdNetwork,
    boundary_tolerant_equal,
    bright,
    randomize_,
    read_output,
    run_inference,
    write_nifti,
)
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from scipy import ndimage

from custom.data import CaseList
from custom.networks import build_sam_med3d
from custom.predictor import VolumetricPredictor
from custom.window import extract_window, normalize_crop


def test_normalize_crop_matches_upstream_formula():
    crop = torch.tensor([[0.0, 0.0, 2.0, 4.0, 9.0, -3.0]])
    positive = np.array([2.0, 4.0, 9.0])
    expected = (crop.numpy() - positive.mean()) / positive.std(ddof=1)
    np.testing.assert_allclose(normalize_crop(crop).numpy(), expected, rtol=1e-6)


def test_extract_window_pads_outside_the_image():
    image = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6)
    window = extract_window(image, (-2, 1, 3), 4)
    assert window.shape == (1, 4, 4, 4)
    assert torch.all(window[:, :2] == 0) and torch.all(window[:, :, :, 3:] == 0)
    assert torch.equal(window[0, 2:, :, :3], image[0, :2, 1:5, 3:6])


def test_identity_geometry_is_exact(tmp_path):
    """1.5 mm RAS in, no resampling: the output must equal ``image > 50`` voxel for voxel."""
    rng = np.random.default_rng(0)
    blob = ndimage.gaussian_filter(rng.normal(size=(20, 26, 22)), 2) > 0.05
    image = np.where(blob, 100.0, 10.0) + rng.uniform(0, 5, blob.shape)
    path = write_nifti(tmp_path / "ras.nii.gz", image, np.diag([1.5, 1.5, 1.5, 1.0]))
    click = np.argwhere(blob)[0].tolist()
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": path, "points": [click], "point_labels": [1]}
    )
    mask, affine, report = read_output(out, "ras")
    assert mask.shape == blob.shape
    np.testing.assert_array_equal(mask, blob.astype(mask.dtype))
    np.testing.assert_allclose(affine, np.diag([1.5, 1.5, 1.5, 1.0]))
    assert report["objects"][0]["points"] == [click]


def _lps_anisotropic_case(tmp_path, name="lps"):
    """An LPS-stored, anisotropic volume with a box defined in world coordinates; returns path, mask, affine."""
    spacing = np.array([0.9, 1.2, 2.5])
    shape = (40, 30, 16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # L, P, S: x and y flipped in RAS
    affine[:3, 3] = [20.0, -5.0, -10.0]
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    box = np.all((world > [-8.0, -30.0, 0.0]) & (world < [8.0, -12.0, 18.0]), axis=-1)
    image = np.where(box, 100.0, 10.0)
    return write_nifti(tmp_path / f"{name}.nii.gz", image, affine), box, affine


def test_lps_anisotropic_paste_back(tmp_path):
    path, box, affine = _lps_anisotropic_case(tmp_path)
    click = np.argwhere(box).mean(0).round().astype(int).tolist()
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": path, "points": [click], "point_labels": [1]}
    )
    mask, out_affine, _ = read_output(out, "lps")
    assert mask.shape == box.shape
    np.testing.assert_allclose(out_affine, affine, atol=1e-5)
    assert boundary_tolerant_equal(mask > 0, box)
    assert abs(int((mask > 0).sum()) - int(box.sum())) < 0.25 * box.sum()


def test_voxel_and_world_points_agree(tmp_path):
    path, box, affine = _lps_anisotropic_case(tmp_path)
    click = np.argwhere(box)[5]
    world = (affine @ np.r_[click, 1.0])[:3].tolist()
    common = dict(image=path, point_labels=[1])
    out_voxel = run_inference(tmp_path / "v", ThresholdNetwork(), input_dict=dict(common, points=[click.tolist()]))
    out_world = run_inference(tmp_path / "w", ThresholdNetwork(), input_dict=dict(common, points_world=[world]))
    voxel_mask, _, voxel_report = read_output(out_voxel, "lps")
    world_mask, _, world_report = read_output(out_world, "lps")
    np.testing.assert_array_equal(voxel_mask, world_mask)
    assert voxel_report["objects"][0]["windows"] == world_report["objects"][0]["windows"]


def test_object_larger_than_a_window_comes_back_whole(tmp_path):
    shape = (30, 100, 24)  # at 1.5 mm: a 32^3 window covers a third of axis 1
    image = np.full(shape, 10.0)
    rod = np.zeros(shape, dtype=bool)
    rod[10:20, 3:97, 8:16] = True
    image[rod] = 100.0
    path = write_nifti(tmp_path / "rod.nii.gz", image, np.diag([1.5, 1.5, 1.5, 1.0]))
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": path, "points": [[15, 10, 12]], "point_labels": [1]}
    )
    mask, _, report = read_output(out, "rod")
    np.testing.assert_array_equal(mask > 0, rod)  # whole, and no seam: every voxel of the rod is there
    assert len(report["objects"][0]["windows"]) >= 5


def test_growth_stops_at_max_windows(tmp_path):
    shape = (30, 100, 24)
    image = bright(shape)  # "everything is the object": growth must stop at the limit
    path = write_nifti(tmp_path / "full.nii.gz", image, np.diag([1.5, 1.5, 1.5, 1.0]))
    out = run_inference(
        tmp_path,
        ThresholdNetwork(),
        max_windows_per_object=3,
        input_dict={"image": path, "points": [[15, 50, 12]], "point_labels": [1]},
    )
    _, _, report = read_output(out, "full")
    assert len(report["objects"][0]["windows"]) == 3


def test_several_objects_share_embeddings(tmp_path):
    shape = (60, 30, 30)
    image = np.full(shape, 10.0)
    image[5:12, 10:20, 10:20] = 100.0
    image[45:55, 10:20, 10:20] = 100.0
    path = write_nifti(tmp_path / "two.nii.gz", image, np.diag([1.5, 1.5, 1.5, 1.0]))
    network = ThresholdNetwork(img_size=64)
    objects = [
        {"label": 3, "points": [[8, 15, 15]], "point_labels": [1]},
        {"label": 5, "points": [[50, 15, 15]], "point_labels": [1]},
        {"label": 6, "points": [[9, 14, 15]], "point_labels": [1]},
    ]
    out = run_inference(tmp_path, network, roi_size=64, input_dict={"image": path, "objects": objects})
    mask, _, report = read_output(out, "two")
    # objects 3 and 6 are the same place: 6 (later) overwrites 3 and reuses its embedding
    assert set(np.unique(mask)) == {0, 5, 6}
    assert report["objects"][2]["windows"] == report["objects"][0]["windows"]
    assert report["objects"][2]["windows_encoded"] == 0
    assert report["embeddings_computed"] == network.encoded


def test_click_memory_and_mask_prompt_order():
    calls = []

    class Recorder(ThresholdNetwork):
        def decode(self, embedding, point_coords, point_labels, mask_input=None):
            calls.append((point_coords[0].tolist(), point_labels[0].tolist(), mask_input is None))
            return super().decode(embedding, point_coords, point_labels, mask_input)

    image = MetaTensor(torch.full((1, 20, 20, 20), 100.0), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0])))
    clicks = [([10.0, 10, 10], True), ([12.0, 10, 10], False), ([5.0, 5, 5], True)]
    for memory, expected in (
        (
            "all",
            [
                ([[16.0, 16, 16]], [1], True),
                ([[16.0, 16, 16], [18.0, 16, 16]], [1, 0], False),
                ([[16.0, 16, 16], [18.0, 16, 16], [11.0, 11, 11]], [1, 0, 1], False),
            ],
        ),
        ("newest", [([[16.0, 16, 16]], [1], True), ([[18.0, 16, 16]], [0], False), ([[11.0, 11, 11]], [1], False)]),
    ):
        calls.clear()
        predictor = VolumetricPredictor(
            Recorder(), spacing_mm=1.5, roi_size=32, click_memory=memory, intensity_normalization=None
        )
        predictor.set_image(image)
        for point, positive in clicks:
            predictor.add_click("object", point, positive)
        assert calls == expected


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"points": [[1, 2]], "point_labels": [1]}, "3 finite numbers"),
        ({"points": [[1, 2, 3]], "point_labels": [1, 0]}, "one label per point"),
        ({"points": [[1, 2, 3]], "point_labels": [2]}, "must be 0 or 1"),
        ({"points": [[1, 2, 3]], "point_labels": [0]}, "no positive click"),
        ({"points": [[1, 2, 3]], "points_world": [[1, 2, 3]], "point_labels": [1]}, "exactly one of"),
        ({"foreground": [], "background": []}, "hold no click"),
        ({"foreground": [], "background": [[1, 2, 3]]}, "no positive click"),
        ({"foreground": "1 2 3"}, "'foreground' must be a list"),
        ({"foreground": [[1, 2, 3]], "points": [[1, 2, 3]], "point_labels": [1]}, "not both"),
        (
            {
                "objects": [
                    {"label": 1, "points": [[1, 2, 3]], "point_labels": [1]},
                    {"label": 1, "points": [[1, 2, 3]], "point_labels": [1]},
                ]
            },
            "distinct",
        ),
    ],
)
def test_bad_prompts_are_named(tmp_path, entry, message):
    path = write_nifti(tmp_path / "case7.nii.gz", np.zeros((8, 8, 8)), np.eye(4))
    cases = CaseList.prompted(input_dict=dict(entry, image=path))
    assert not cases.cases and len(cases.failures) == 1
    assert message in cases.failures[0] and "case7" in cases.failures[0]
    with pytest.raises(RuntimeError, match="1 case"):
        cases.raise_if_failed()


def test_bad_cases_are_reported_and_the_rest_run(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", bright((10, 10, 10)), np.diag([1.5, 1.5, 1.5, 1]))
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 10)), np.eye(4))
    movie = write_nifti(tmp_path / "movie.nii.gz", np.zeros((6, 6, 6, 3)), np.eye(4))
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    click = {"points": [[5, 5, 5]], "point_labels": [1]}
    datalist = [
        dict(click, image=flat),
        dict(click, image=movie),
        dict(click, image=str(tmp_path / "broken.nii.gz")),
        dict(click, image=str(tmp_path / "missing.nii.gz")),
        {"image": good, "points": [[5, 5, 50]], "point_labels": [1]},
        dict(click, image=good),
    ]
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, ThresholdNetwork(), datalist=str(tmp_path / "list.json"))
    message = str(err.value.__cause__)
    assert "5 case(s) failed" in message
    assert "flat.nii.gz: expected a 3D single-channel image, got a 2D image" in message
    assert "movie.nii.gz: expected a 3D single-channel image, got a 3-channel/4D image" in message
    assert "'broken'" in message and "'missing'" in message and "does not exist" in message
    assert "point [5.0, 5.0, 50.0] (voxels) is outside the image" in message
    # the same image listed twice: the second entry gets its own output name
    mask, _, _ = read_output(tmp_path / "out", "good_2")
    assert mask.shape == (10, 10, 10) and mask.min() == 1


def _tiny_checkpoint(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": randomize_(build_sam_med3d("sam_med3d_tiny"), seed=0).state_dict()}, ckpt)
    return ckpt


def test_missing_weights_say_where_to_get_them(tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), workflow_type="infer", ckpt_path=str(tmp_path / "none.pt")
    )
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:
        workflow.run()
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert "none.pt" in str(cause) and "blueyo0/SAM-Med3D" in str(cause) and "convert_checkpoint.py" in str(cause)


def test_workflow_has_the_infer_properties(tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        workflow_type="infer",
        network_name="sam_med3d_tiny",
        ckpt_path=str(_tiny_checkpoint(tmp_path)),
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    for top_level_id in ("network_def", "network", "preprocessing", "inferer", "postprocessing", "evaluator", "run"):
        assert top_level_id in workflow.parser.config


def test_bundle_run_on_the_shipped_sample(tmp_path):
    """End to end through ``python -m monai.bundle run`` on the shipped case, with a checkpoint written here."""
    ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "bundle_out"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--bundle_root",
        str(REPO_ROOT / "bundle"),
        "--network_name",
        "sam_med3d_tiny",
        "--ckpt_path",
        str(ckpt),
        "--output_dir",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = out / "openkbp_pt_243" / "openkbp_pt_243_seg"
    assert f"openkbp_pt_243: wrote {written}.nii.gz and {written}.json" in result.stdout  # the log names the files
    source = nib.load(REPO_ROOT / "bundle/sample/images/openkbp_pt_243.nii.gz")
    mask, affine, report = read_output(out, "openkbp_pt_243")
    assert mask.shape == source.shape
    np.testing.assert_allclose(affine, source.affine, atol=1e-5)
    assert [o["label"] for o in report["objects"]] == [1, 2, 3, 4, 7]
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 4, 7}


def test_monai_label_client_form_on_the_command_line(tmp_path):
    """``--input_dict`` in the form MONAI Label clients send (``foreground`` / ``background`` voxel lists) gives
    the mask of the equivalent ``points`` / ``point_labels`` case: one object, label 1."""
    ckpt = _tiny_checkpoint(tmp_path)
    image = str(REPO_ROOT / "bundle/sample/images/openkbp_pt_243.nii.gz")
    positive, negative = [69, 64, 33], [69, 64, 45]
    forms = {
        "client": {"image": image, "foreground": [positive], "background": [negative]},
        "points": {"image": image, "points": [positive, negative], "point_labels": [1, 0]},
    }
    outputs = {}
    for name, entry in forms.items():
        out = tmp_path / name
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json")]
        cmd += ["--bundle_root", str(REPO_ROOT / "bundle"), "--network_name", "sam_med3d_tiny"]
        cmd += ["--ckpt_path", str(ckpt), "--max_windows_per_object", "1"]  # random weights: no growth
        cmd += ["--output_dir", str(out), "--input_dict", repr(entry)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = read_output(out, "openkbp_pt_243")
    (client, client_affine, client_report), (points, points_affine, points_report) = outputs.values()
    assert client.shape == nib.load(image).shape
    np.testing.assert_array_equal(client, points)
    np.testing.assert_array_equal(client_affine, points_affine)
    assert [o["label"] for o in client_report["objects"]] == [1]
    for report in (client_report, points_report):
        for obj in report["objects"]:
            obj.pop("seconds")
    assert client_report["objects"] == points_report["objects"]
    assert client_report["objects"][0]["point_labels"] == [1, 0]


class MaskEchoNetwork(ThresholdNetwork):
    """decode: the mask prompt it was given (zeros without one): shows what ``prev_mask`` feeds the model."""

    def decode(self, embedding, point_coords, point_labels, mask_input=None):
        if mask_input is None:
            mask_input = torch.full((embedding.shape[0], 1, *[4 * s for s in embedding.shape[2:]]), -4.0)
        return mask_input, embedding.new_zeros(embedding.shape[0], 1)


def test_prev_mask_continues_an_earlier_result(tmp_path):
    shape = (24, 28, 20)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    path = write_nifti(tmp_path / "cont.nii.gz", bright(shape), affine)
    earlier = np.zeros(shape, np.int16)
    earlier[4:12, 8:20, 5:15] = 2
    earlier[15:20, 2:6, 2:6] = 5  # another object of the earlier result: not asked for, not returned
    nib.Nifti1Image(earlier, affine).to_filename(tmp_path / "earlier.nii.gz")
    entry = {
        "image": path,
        "prev_mask": str(tmp_path / "earlier.nii.gz"),
        "objects": [{"label": 2, "points": [[8, 2, 10]], "point_labels": [0]}],
    }  # a negative click only
    out = run_inference(tmp_path, MaskEchoNetwork(), input_dict=entry)
    mask, _, _ = read_output(out, "cont")
    np.testing.assert_array_equal(mask == 2, earlier == 2)
    assert set(np.unique(mask)) == {0, 2}


def test_prev_mask_must_match_its_image(tmp_path):
    path = write_nifti(tmp_path / "img.nii.gz", bright((10, 10, 10)), np.eye(4))
    nib.Nifti1Image(np.zeros((10, 10, 9), np.int16), np.eye(4)).to_filename(tmp_path / "old.nii.gz")
    entry = {"image": path, "prev_mask": str(tmp_path / "old.nii.gz"), "points": [[5, 5, 5]], "point_labels": [1]}
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, ThresholdNetwork(), input_dict=entry)
    assert "old.nii.gz: prev_mask of shape (10, 10, 9) does not match its image" in str(err.value.__cause__)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_land_on_the_same_grid_as_nifti(tmp_path, suffix):
    import itk

    rng = np.random.default_rng(1)
    volume = np.where(rng.random((12, 14, 16)) > 0.6, 100.0, 10.0).astype(np.float32)  # ITK array order z, y, x
    image = itk.image_from_array(volume)
    image.SetSpacing([1.5, 1.5, 1.5])
    image.SetOrigin([10.0, -20.0, 5.0])
    itk.imwrite(image, str(tmp_path / f"vol{suffix}"))
    # the same volume as NIfTI: x, y, z array order, LPS origin turned into a RAS affine
    ras = np.diag([-1.5, -1.5, 1.5, 1.0])
    ras[:3, 3] = [-10.0, 20.0, 5.0]
    write_nifti(tmp_path / "vol.nii.gz", volume.transpose(2, 1, 0), ras)
    click = {"points": [[3, 4, 5]], "point_labels": [1]}
    out_itk = run_inference(
        tmp_path / "a", ThresholdNetwork(), input_dict=dict(click, image=str(tmp_path / f"vol{suffix}"))
    )
    out_nii = run_inference(
        tmp_path / "b", ThresholdNetwork(), input_dict=dict(click, image=str(tmp_path / "vol.nii.gz"))
    )
    mask_itk, affine_itk, _ = read_output(out_itk, "vol")
    mask_nii, affine_nii, _ = read_output(out_nii, "vol")
    np.testing.assert_allclose(affine_itk, affine_nii, atol=1e-5)
    np.testing.assert_array_equal(mask_itk, mask_nii)
    np.testing.assert_array_equal(mask_nii > 0, volume.transpose(2, 1, 0) > 50)


def test_dicom_series_folder(tmp_path):
    import itk

    volume = np.full((12, 16, 18), 10, np.int16)  # z, y, x
    volume[3:9, 4:12, 5:14] = 100
    image = itk.image_from_array(volume)
    folder = tmp_path / "series"
    folder.mkdir()
    names = [str(folder / f"slice{i:03d}.dcm") for i in range(volume.shape[0])]
    writer = itk.ImageSeriesWriter[itk.Image[itk.SS, 3], itk.Image[itk.SS, 2]].New(
        Input=image, ImageIO=itk.GDCMImageIO.New(), FileNames=names
    )
    writer.Update()
    out = run_inference(
        tmp_path, ThresholdNetwork(), input_dict={"image": str(folder), "points": [[8, 8, 5]], "point_labels": [1]}
    )
    mask, affine, _ = read_output(out, "series")
    assert mask.shape == (18, 16, 12)  # x, y, z: the stored array order
    assert boundary_tolerant_equal(mask > 0, volume.transpose(2, 1, 0) > 50)
    np.testing.assert_allclose(np.abs(np.diag(affine))[:3], [1.0, 1.0, 1.0])


def test_worker_processes_share_the_cases_and_report_failures(tmp_path):
    images = [write_nifti(tmp_path / f"w{i}.nii.gz", bright((12, 12, 12)), np.eye(4)) for i in range(3)]
    datalist = [{"image": p, "points": [[5, 5, 5]], "point_labels": [1]} for p in images]
    datalist.append({"image": images[0], "points": [[5, 5, 50]], "point_labels": [1]})  # outside: fails
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    with pytest.raises(RuntimeError) as err:
        run_inference(tmp_path, ThresholdNetwork(), datalist=str(tmp_path / "list.json"), num_workers=2)
    message = str(err.value.__cause__)
    assert "1 case(s) failed" in message and "'w0_2'" in message and "outside the image" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["w0", "w1", "w2"]  # each case once
