"""A MONAI Label app that serves this bundle: clicks in, a label map on the image's own grid out.

    monailabel start_server --app bundle/monailabel --studies /data/images --conf bundle PACKAGED_BUNDLE

``PACKAGED_BUNDLE`` is a folder written by ``python bundle/scripts/package.py`` (the bundle with its ``custom``
package inside). See README.md beside this file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.transforms import SaveImaged
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)


class SamMed3DApp(MONAILabelApp):
    """One infer task, ``sam_med3d``, of the deepedit type (MONAI Label's clients send foreground / background
    clicks, or clicks under label names)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        bundle = conf.get("bundle") or os.environ.get("SAM_MED3D_BUNDLE")
        if not bundle or not (Path(bundle) / "configs" / "inference.json").is_file():
            raise ValueError(
                f"--conf bundle PATH must name a packaged bundle (configs/inference.json inside), got {bundle!r}; "
                "write one with `python bundle/scripts/package.py --output_dir DIR`"
            )
        self.bundle = str(Path(bundle).resolve())
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="SAM-Med3D", description=__doc__)

    def init_infers(self) -> dict:
        from custom.transforms import SaveSegmentationd  # importable once the task put the bundle on sys.path

        task = BundleInferTask(
            self.bundle,
            self.conf,
            type="deepedit",
            post_filter=[SaveImaged, SaveSegmentationd],  # MONAI Label writes the result itself
            load_strict=True,
        )
        if not task.is_valid():
            raise ValueError(f"{self.bundle} is not a usable bundle for MONAI Label (see the log)")
        task.bundle_config["preview"] = False  # MONAI Label shows the result itself: no preview PNGs
        return {"sam_med3d": task}
