"""Write the bundle in the MONAI model-zoo layout, with its code inside, as a folder and a zip.

    python bundle/scripts/package.py --output_dir dist

gives ``dist/sam_med3d/`` (``configs/``, ``models/``, ``docs/``, ``sample/``, ``scripts/``, ``monailabel/``,
``large_files.yml``, ``LICENSE`` and the ``custom`` package) and ``dist/sam_med3d.zip``. Inside the folder,
``bundle_root`` is ``"."`` and ``$import custom`` resolves with the folder on ``sys.path`` (the working directory
of ``python -m monai.bundle run``, as model-zoo bundles carry ``scripts/``):

    cd dist/sam_med3d && python -m monai.bundle run --config_file configs/inference.json

After replacing ``bundle/models/model.pt``, ``--update_hashes`` first writes its new ``hash_val`` into
``bundle/large_files.yml`` (commit that file with the model):

    python bundle/scripts/package.py --update_hashes
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import fire
from monai.bundle import ConfigParser

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
    ("bundle/large_files.yml", "large_files.yml"),
    ("custom", "custom"),
    ("LICENSE", "LICENSE"),
)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "sam_med3d*.pth", "sam_med3d*.pt", "exported")


LARGE_FILES = BUNDLE_ROOT / "large_files.yml"


def file_hash(path: str | Path, hash_type: str = "sha256") -> str:
    """The hex digest of a file, as ``monai.apps.utils.check_hash`` computes it."""
    digest = hashlib.new(hash_type.lower())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stale_hashes(large_files: Path = LARGE_FILES) -> dict[str, tuple[str, str]]:
    """Entries of ``large_files.yml`` with a ``hash_val`` whose file, present beside it, has another hash:
    ``{path: (listed, actual)}``."""
    stale = {}
    for entry in ConfigParser.load_config_file(large_files)["large_files"]:
        path = large_files.parent / entry["path"]
        if entry.get("hash_val") and path.is_file():
            actual = file_hash(path, entry.get("hash_type", "sha256"))
            if actual != entry["hash_val"]:
                stale[entry["path"]] = (entry["hash_val"], actual)
    return stale


def refresh_hashes(large_files: Path = LARGE_FILES) -> dict[str, tuple[str, str]]:
    """Rewrite, in place (comments kept), each stale ``hash_val`` of ``large_files.yml``; returns what changed."""
    stale = stale_hashes(large_files)
    text = large_files.read_text()
    for listed, actual in stale.values():
        text, count = re.subn(rf'(hash_val:\s*"?){re.escape(listed)}("?)', rf"\g<1>{actual}\g<2>", text)
        if count != 1:
            raise ValueError(f"{large_files}: hash_val {listed} found {count} times, expected once")
    large_files.write_text(text)
    for path, (listed, actual) in stale.items():
        print(f"{large_files}: {path} hash_val {listed} -> {actual}")
    return stale


def package(
    output_dir: str = "dist", name: str = "sam_med3d", make_zip: bool = True, update_hashes: bool = False
) -> str:
    """Write ``<output_dir>/<name>/`` (replacing an earlier one) and, with ``make_zip``, ``<output_dir>/<name>.zip``.

    Args:
        update_hashes: first refresh ``bundle/large_files.yml``'s ``hash_val`` of files that changed (a new
            ``model.pt``); without it, a stale hash is reported and packaged as it is.

    Returns:
        the bundle folder.
    """
    if update_hashes:
        refresh_hashes()
    for path, (listed, actual) in stale_hashes().items():
        print(
            f"WARNING: {LARGE_FILES} lists {path} with hash_val {listed}, the file has {actual}: "
            "refresh it with `python bundle/scripts/package.py --update_hashes`",
            file=sys.stderr,
        )
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
