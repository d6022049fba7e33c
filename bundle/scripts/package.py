"""Write the bundle in the MONAI model-zoo layout, with its code inside, as a folder and a zip.

    python bundle/scripts/package.py --output_dir dist

gives ``dist/sam_med3d/`` (``configs/``, ``models/``, ``docs/``, ``sample/``, ``scripts/``, ``monailabel/``,
``LICENSE`` and the ``custom`` package) and ``dist/sam_med3d.zip``. Inside the folder, ``bundle_root`` is ``"."``
and ``$import custom`` resolves with the folder on ``sys.path`` (the working directory of ``python -m
monai.bundle run``, as model-zoo bundles carry ``scripts/``):

    cd dist/sam_med3d && python -m monai.bundle run --config_file configs/inference.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import fire

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = BUNDLE_ROOT.parent
sys.path.insert(0, str(REPOSITORY))

from custom.files import write_atomic  # noqa: E402

#: what the packaged bundle holds: (source relative to the repository, destination relative to the bundle)
CONTENT = (
    ("bundle/configs", "configs"),
    ("bundle/models", "models"),
    ("bundle/docs", "docs"),
    ("bundle/sample", "sample"),
    ("bundle/scripts", "scripts"),
    ("bundle/monailabel", "monailabel"),
    ("custom", "custom"),
    ("LICENSE", "LICENSE"),
)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "sam_med3d*.pth", "sam_med3d*.pt", "exported")


def package(output_dir: str = "dist", name: str = "sam_med3d", make_zip: bool = True) -> str:
    """Write ``<output_dir>/<name>/`` (replacing an earlier one) and, with ``make_zip``, ``<output_dir>/<name>.zip``.

    Returns:
        the bundle folder.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=output_dir)) / name
    for source, destination in CONTENT:
        src = REPOSITORY / source
        if src.is_dir():
            shutil.copytree(src, staging / destination, ignore=IGNORED)
        else:
            shutil.copy2(src, staging / destination)
    for config in (staging / "configs").glob("*.json"):
        content = json.loads(config.read_text())
        if "bundle_root" in content:
            content["bundle_root"] = "."  # the packaged folder is the bundle: run from inside it
            config.write_text(json.dumps(content, indent=4) + "\n")
    bundle = output_dir / name
    if bundle.exists():
        shutil.rmtree(bundle)
    staging.rename(bundle)
    staging.parent.rmdir()
    if make_zip:
        archive = output_dir / f"{name}.zip"
        write_atomic(
            archive, lambda tmp: shutil.move(shutil.make_archive(tmp[: -len(".zip")], "zip", output_dir, name), tmp)
        )
        print(f"wrote {archive}")
    print(f"wrote {bundle}")
    return str(bundle)


if __name__ == "__main__":
    fire.Fire(package)
