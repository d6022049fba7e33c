"""Segment one image from clicks, with every value taken as given (no MONAI expression parsing).

Use it instead of ``--input_dict`` when file names or values come from elsewhere (a wrapper, a web form):
MONAI's config parser evaluates strings that start with ``$``. Example::

    python bundle/scripts/segment.py --image ct.nii.gz --points "[[210, 180, 52]]" --point_labels "[1]" \\
        --modality CT --output_dir out
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT.parent))  # the package `custom` beside (repository) or inside (zoo) the bundle
sys.path.insert(0, str(BUNDLE_ROOT))

from custom.api import segment  # noqa: E402


def main(image: str, points=None, point_labels=None, **options) -> str:
    """Fire entry: ``--image``, ``--points``, ``--point_labels`` and the keyword options of
    :func:`custom.api.segment` (``--objects``, ``--space``, ``--output_dir``, ``--modality``, ``--prev_mask``,
    ``--network_name``, ``--ckpt_path``, ``--click_memory``, ``--autocast_dtype``...)."""
    return str(segment(image, points, point_labels, bundle_root=options.pop("bundle_root", BUNDLE_ROOT), **options))


if __name__ == "__main__":
    fire.Fire(main)
