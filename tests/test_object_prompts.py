"""The one form prompts travel in (custom.object_prompts): made and checked once by ClicksToVoxelsd, carried whole
through the case loader's collation and MONAI's de-collation, read by the inferer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch

from custom.cases import CaseError
from custom.data import CaseList, collate_cases
from custom.object_prompts import PROMPTS_META, CasePrompts, ObjectPrompts, check_inside_image, world_to_voxel
from custom.transforms import ClicksToVoxelsd

# 2 x 1.5 x 3 mm voxels, the first axis flipped, an origin away from zero
AFFINE = np.array([[-2.0, 0, 0, 40], [0, 1.5, 0, -10], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def _image(shape=(20, 16, 10)) -> MetaTensor:
    return MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(AFFINE), meta={"filename_or_obj": "ct.nii.gz"})


def _case(tmp_path, **entry) -> dict:
    """A parsed case on a small NIfTI file (parsing checks that the image exists)."""
    path = tmp_path / "ct.nii.gz"
    nib.Nifti1Image(np.zeros((20, 16, 10), np.float32), AFFINE).to_filename(path)
    return CaseList.prompted(input_dict={"image": str(path), **entry}).cases[0]


def test_world_clicks_become_stored_grid_voxels_once_and_the_request_is_kept(tmp_path):
    voxel = np.array([3.0, 4.5, 7.0])
    world = (AFFINE @ np.r_[voxel, 1])[:3]  # the forward mapping, computed independently of the code's inverse
    case = _case(tmp_path, points_world=[world.tolist()], point_labels=[1])
    image = _image()
    out = ClicksToVoxelsd()({**case, "image": image})
    prompts = out["objects"]
    assert isinstance(prompts, CasePrompts) and len(prompts.objects) == 1
    obj = prompts.objects[0]
    ((point, positive),) = obj.clicks
    np.testing.assert_allclose(point, voxel, atol=1e-9)
    assert positive is True and obj.label == 1 and obj.box is None
    assert obj.given["points"] == [world.tolist()] and obj.given["space"] == "world"
    assert image.meta[PROMPTS_META] is prompts  # the same objects for an inferer called without them, no copy
    np.testing.assert_allclose(world_to_voxel(world[None], AFFINE), voxel[None], atol=1e-9)


def test_a_click_outside_the_image_names_the_case_the_object_and_the_point(tmp_path):
    case = _case(tmp_path, points=[[5, 5, 9.4], [5, 5, 9.6]], point_labels=[1, 0])
    with pytest.raises(CaseError, match=r"object label 1: point \[5.0, 5.0, 9.6\] \(voxels\) is outside the image"):
        ClicksToVoxelsd()({**case, "image": _image()})
    check_inside_image(np.array([[-0.4, 0, 0]]), [[-0.4, 0, 0]], "voxel", (2, 2, 2))  # voxel 0 spans -0.5 .. 0.5
    with pytest.raises(CaseError, match=r"\[-0.6, 0, 0\] \(voxels\)"):
        check_inside_image(np.array([[-0.6, 0, 0]]), [[-0.6, 0, 0]], "voxel", (2, 2, 2))


def test_the_case_loader_carries_each_items_prompts_whole_through_collation_and_decollation():
    first = CasePrompts((ObjectPrompts(1, (((1.0, 2.0, 3.0), True),)), ObjectPrompts(4, ())))
    second = CasePrompts((ObjectPrompts(2, (((0.0, 0.0, 0.0), False), ((1.0, 1.0, 1.0), True))),))
    items = []
    for prompts in (first, second):
        image = _image((4, 4, 4))
        image.meta[PROMPTS_META] = prompts
        items.append({"image": image, "objects": prompts, "case": "c"})
    batch = collate_cases(items)
    assert batch["objects"] == [first, second] and batch["image"].shape == (2, 1, 4, 4, 4)
    assert PROMPTS_META not in batch["image"].meta  # the batch key carries them, once
    back = decollate_batch(batch)  # what a MONAI engine does before post-processing
    assert [item["objects"] for item in back] == [first, second]
    assert all(isinstance(item["objects"], CasePrompts) for item in back)
    plain = collate_cases([{"image": _image((4, 4, 4)), "case": "c"}])  # no prompts: no key
    assert "objects" not in plain
