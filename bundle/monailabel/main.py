"""A MONAI Label app that serves this bundle: clicks in, a label map on the image's own grid out.

    monailabel start_server --app bundle/monailabel --studies /data/images --conf bundle PACKAGED_BUNDLE

``PACKAGED_BUNDLE`` is a folder written by ``python bundle/scripts/package.py`` (the bundle with its ``custom``
package inside); the app runs the bundle's own code from there, whatever else is installed. Options
(``--conf NAME VALUE``):

- ``bundle``: the packaged bundle (or the environment variable ``SAM_MED3D_BUNDLE``);
- ``labels``: a label table as ``docs/labels.json`` (``{"labels": [{"value", "name", "color"}, ...]}``), default
  the bundle's own: the names offered to clients and the values clicks under those names are segmented as;
- ``kept_images``: predictors kept across requests (default 2; see :class:`custom.inferer.PredictorCache`);
- ``skip_trainers``: ``true`` leaves out the train task.

See README.md beside this file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.transforms import SaveImaged
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.class_utils import unload_module
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

#: what the app offers when the bundle has no label table
DEFAULT_LABELS = {"background": 0, "foreground": 1}


def use_bundle_code(bundle: str) -> None:
    """Put the bundle first on ``sys.path`` and import its ``custom`` package from there (one imported from
    elsewhere, such as an installed checkout of the project, is unloaded first)."""
    if bundle not in sys.path:
        sys.path.insert(0, bundle)
    loaded = sys.modules.get("custom")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(bundle + os.sep):
        unload_module("custom")
    import custom  # noqa: F401  (the bundle's)

    logger.info(f"SAM-Med3D: the bundle's code: {Path(custom.__file__).parent}")


def read_label_table(path: str | os.PathLike) -> dict[str, int]:
    """name -> value of a label table (``docs/labels.json``); :data:`DEFAULT_LABELS` if there is none."""
    path = Path(path)
    if not path.is_file():
        logger.warning(f"SAM-Med3D: no label table at {path}; offering {DEFAULT_LABELS}")
        return dict(DEFAULT_LABELS)
    entries = json.loads(path.read_text())["labels"]
    labels = {str(entry["name"]): int(entry["value"]) for entry in entries}
    if len(set(labels.values())) != len(labels):
        raise ValueError(f"{path}: label values must be unique, got {labels}")
    return labels


class ObjectCentroidsd:
    """Each object's centre (the mean voxel index of its mask, rounded) as MONAI Label's radiology app gives
    them: ``centroids = [{"label_<value>": [value, i, j, k]}, ...]``, which the server passes on in its answer."""

    def __init__(self, key: str = "pred", centroids_key: str = "centroids") -> None:
        self.key, self.centroids_key = key, centroids_key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        label_map = d[self.key]
        label_map = np.asarray(label_map.detach().cpu() if isinstance(label_map, torch.Tensor) else label_map)
        label_map = label_map.reshape(label_map.shape[-3:])
        inside = np.flatnonzero(label_map)  # the objects are small beside the image: only their voxels
        values = label_map.ravel()[inside]
        centroids = []
        for value in np.unique(values):
            where = np.unravel_index(inside[values == value], label_map.shape)
            centre = [int(round(float(axis.mean()))) for axis in where]
            centroids.append({f"label_{int(value)}": [int(value), *centre]})
        d[self.centroids_key] = centroids
        return d


class KeepPromptReportd:
    """The inferer's report (in the label map's metadata, which MONAI Label's restoring drops) kept under
    ``prompt_report`` for the answer."""

    def __init__(self, key: str = "pred") -> None:
        self.key = key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        from custom.transforms import PROMPT_REPORT

        d = dict(data)
        report = getattr(d[self.key], "meta", {}).get(PROMPT_REPORT)
        if report is not None:
            d[PROMPT_REPORT] = report[0] if isinstance(report, (list, tuple)) else report
        return d


class _BundleKeys(BundleConstants):
    """The config keys this bundle has: MONAI Label looks each alternative up on every request, and a missing
    key costs a fuzzy-match search over every key of the config."""

    def key_preprocessing(self):
        return ["preprocessing"]

    def key_postprocessing(self):
        return ["postprocessing"]

    def key_detector(self):
        return []

    def key_detector_ops(self):
        return []

    def key_displayable_configs(self):
        return []


#: the pre-processing that depends on the image file alone (loaded once per image, see ``run_pre_transforms``)
_IMAGE_STAGE = frozenset({"LoadImageTensord", "LoadVolumed", "EnsureChannelFirstd", "EnsureVolumed"})


class SamMed3DInferTask(BundleInferTask):
    """The bundle's inference as a deepedit-type task: clicks in, the prompted objects' label map out.

    - one predictor per image is kept across requests (:class:`custom.inferer.PredictorCache`): a further click
      on the same image costs one prompt step, not an image encoding and every click again; the loaded image
      is kept alike (same key: file, modification time, size), and the transforms and the inferer are built
      once, not per request;
    - clicks under label names (deepedit) are segmented with the values of the label table; the answer's
      ``label_names`` are the objects of the request with the values their masks hold (``{"foreground": 1}``
      for foreground/background clicks), ``centroids`` holds each object's centre, and ``predictor`` says
      whether the image's predictor was kept from an earlier request and how many windows were encoded;
    - a request the bundle cannot segment as given (no clicks, a click outside the image, an unreadable image)
      gets HTTP 422 with the bundle's message, not 500.
    """

    def __init__(self, bundle: str, conf: dict[str, str], labels: dict[str, int], kept_images: int = 2) -> None:
        from custom.inferer import PredictorCache

        super().__init__(
            bundle,
            conf,
            const=_BundleKeys(),
            type="deepedit",
            post_filter=[SaveImaged, _save_segmentation_class()],  # MONAI Label writes the result itself
            load_strict=True,
        )
        if not self.valid:
            return
        self.labels = dict(labels)  # instead of the metadata's output channel (the network's logit channel)
        self.bundle_config["label_names"] = {k: v for k, v in labels.items() if k.lower() != "background"}
        self.predictor_cache = PredictorCache(max_images=kept_images)
        self._images: OrderedDict[tuple, dict] = OrderedDict()  # image key -> the image stage's output
        self._built: dict[tuple, Any] = {}  # (what, device) -> transforms or inferer

    def _once(self, what: str, data, build):
        key = (what, str((data or {}).get("device")))
        if key not in self._built:
            self._built[key] = build(data)
        return self._built[key]

    def pre_transforms(self, data=None):
        return list(self._once("pre", data, super().pre_transforms))

    def inferer(self, data=None):
        def build(data):
            inferer = BundleInferTask.inferer(self, data)
            inferer.predictor_cache = self.predictor_cache
            inferer.failures = None  # a failure propagates (as 422 or 500) instead of an empty label map
            return inferer

        return self._once("inferer", data, build)

    def post_transforms(self, data=None):
        def build(data):
            post = list(BundleInferTask.post_transforms(self, data))
            return [KeepPromptReportd(self.key_pred), *post, ObjectCentroidsd(self.key_pred)]

        return list(self._once("post", data, build))

    def run_pre_transforms(self, data, transforms):
        """The image stage (loading and checking the image) once per image file, kept for the next request of the
        same image (as many images as predictors are kept), then the request's own stage (its clicks)."""
        from custom.inferer import PredictorCache

        image_key = PredictorCache.image_key(data.get("image")) if isinstance(data.get("image"), str) else None
        if image_key is None:
            return super().run_pre_transforms(data, transforms)
        key = (image_key, data.get("series_uid"))
        image_stage = [t for t in transforms if type(t).__name__ in _IMAGE_STAGE]
        request_stage = [t for t in transforms if type(t).__name__ not in _IMAGE_STAGE]
        loaded = self._images.get(key)
        if loaded is None:
            only = {k: data[k] for k in ("image", "image_path", "series_uid") if k in data}
            loaded = super().run_pre_transforms(only, image_stage)
            loaded = {k: loaded[k] for k in ("image", "image_meta_dict") if k in loaded}
            self._images[key] = loaded
            while len(self._images) > self.predictor_cache.max_images:
                self._images.popitem(last=False)
        self._images.move_to_end(key)
        d = dict(data)
        for k, v in loaded.items():
            d[k] = v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        if isinstance(d["image"], MetaTensor):
            d["image"].meta = copy.deepcopy(loaded["image"].meta)  # the request stage writes its clicks there
        return super().run_pre_transforms(d, request_stage)

    def writer(self, data, extension=None, dtype=None):
        result_file, result_json = super().writer(data, extension, dtype)
        from custom.transforms import PROMPT_REPORT

        names = {value: name for name, value in self.labels.items()}
        result_json["prompted_labels"] = {
            str(o.name or names.get(o.label) or f"object {o.label}"): o.label for o in data["objects"].objects
        }
        report = json.loads(data.get(PROMPT_REPORT) or "{}")
        result_json["predictor"] = {
            "reused": bool(report.get("predictor_reused")),  # the image's predictor, kept from a request before
            "embeddings_computed": report.get("embeddings_computed"),  # image windows encoded for this request
        }
        return result_file, result_json

    def __call__(self, request, callbacks=None):
        from custom.cases import CaseError

        try:
            result_file, result_json = super().__call__(request, callbacks)
        except CaseError as err:
            raise HTTPException(status_code=422, detail=f"{type(err).__name__}: {err}") from err
        result_json["label_names"] = result_json.pop("prompted_labels", None) or result_json.get("label_names")
        return result_file, result_json


class SamMed3DTrainTask(BundleTrainTask):
    """Fine-tuning with the bundle's ``configs/train.json`` on the studies' labelled images. The bundle loads its
    own starting weights (``pretrained_ckpt``, with its checkpoint conventions), so MONAI Label's extra
    checkpoint loader is left out. Each request trains into its own folder, ``<bundle>/runs/<time>``; its kept
    weights then become ``<bundle>/models/model.pt`` (written atomically; the one they replace is kept as
    ``models/model_before_<time>.pt``), which the infer task loads at its next request, as MONAI Label's
    active-learning loop expects."""

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        return None

    def _update_overrides(self, overrides: dict) -> None:
        self.run_folder = Path(self.bundle_path) / "runs" / time.strftime("%Y%m%d-%H%M%S")
        overrides["output_dir"] = str(self.run_folder)

    def __call__(self, request, datastore):
        from custom.files import write_atomic

        self.run_folder = None
        result = super().__call__(request, datastore)
        trained = self.run_folder / "model.pt" if self.run_folder is not None else None
        if trained is None or not trained.is_file():
            raise RuntimeError(f"training wrote no model.pt into {self.run_folder}: see the log above")
        shipped = Path(self.bundle_path) / "models" / "model.pt"
        if shipped.is_file():  # kept, and model.pt never missing for a concurrent request
            shutil.copy2(shipped, shipped.with_name(f"model_before_{self.run_folder.name}.pt"))
        write_atomic(shipped, lambda path: shutil.copyfile(trained, path))
        logger.info(f"trained weights {trained} are now {shipped}")
        return result


def _save_segmentation_class():
    from custom.transforms import SaveSegmentationd

    return SaveSegmentationd


class SamMed3DApp(MONAILabelApp):
    """One infer task, ``sam_med3d``, of the deepedit type (MONAI Label's clients send foreground / background
    clicks, or clicks under label names), and its train task."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        bundle = conf.get("bundle") or os.environ.get("SAM_MED3D_BUNDLE")
        if not bundle or not (Path(bundle) / "configs" / "inference.json").is_file():
            raise ValueError(
                f"--conf bundle PATH must name a packaged bundle (configs/inference.json inside), got {bundle!r}; "
                "write one with `python bundle/scripts/package.py --output_dir DIR`"
            )
        self.bundle = str(Path(bundle).resolve())
        use_bundle_code(self.bundle)
        self.label_table = read_label_table(conf.get("labels") or Path(self.bundle) / "docs" / "labels.json")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="SAM-Med3D", description=__doc__)

    def init_infers(self) -> dict:
        task = SamMed3DInferTask(
            self.bundle, self.conf, self.label_table, kept_images=int(self.conf.get("kept_images", 2))
        )
        if not task.is_valid():
            raise ValueError(f"{self.bundle} is not a usable bundle for MONAI Label (see the log)")
        task.bundle_config["preview"] = False  # MONAI Label shows the result itself: no preview PNGs
        return {"sam_med3d": task}

    def init_trainers(self) -> dict:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        task = SamMed3DTrainTask(self.bundle, self.conf)
        return {"sam_med3d": task} if task.is_valid() else {}
