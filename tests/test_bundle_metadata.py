"""Bundle metadata, logging config and schema fixture.

Everything here is offline: the schema that ``metadata.json`` names by URL is shipped as
``tests/data/meta_schema_20240725.json``; ``monai.bundle.verify_metadata`` finds it at ``filepath``
and skips the download.
"""

from __future__ import annotations

import configparser
import copy
import hashlib
import json
import logging
import logging.config
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "bundle" / "configs" / "metadata.json"
LOGGING_CONF = ROOT / "bundle" / "configs" / "logging.conf"
SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# md5 of tests/data/meta_schema_20240725.json, a byte-identical copy of the schema file at SCHEMA_URL;
# pinned so that an edited copy fails here (and verify_metadata raises instead of re-downloading).
SCHEMA_MD5 = "96a120e35492d4ccc5894257175e7359"


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def meta() -> dict:
    return _load(META)


@pytest.fixture(scope="module")
def schema() -> dict:
    return _load(SCHEMA)


# (a) validation ---------------------------------------------------------------------------------


def test_metadata_validates_with_jsonschema(meta, schema):
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(meta), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_broken_metadata_fails_jsonschema(meta, schema):
    broken = copy.deepcopy(meta)
    del broken["version"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(meta)
    broken["network_data_format"]["inputs"]["image"]["num_channels"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_metadata_verifies_with_monai_bundle():
    from monai.bundle import verify_metadata

    # returns None on success, raises ValueError on a validation failure; the hash check makes it
    # raise instead of downloading if the local schema were changed.
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA), hash_val=SCHEMA_MD5, hash_type="md5")


def test_monai_verify_metadata_rejects_broken_copy(meta, tmp_path):
    from monai.bundle import verify_metadata

    broken = copy.deepcopy(meta)
    del broken["authors"]  # a required field
    broken_file = tmp_path / "metadata.json"
    broken_file.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(broken_file), filepath=str(SCHEMA), hash_val=SCHEMA_MD5, hash_type="md5")


def test_metadata_content(meta):
    assert meta["schema"] == SCHEMA_URL
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == "1.6.1"
    # the shipped model's measured results, as bundle/docs/README.md reports them
    card = (ROOT / "bundle" / "docs" / "README.md").read_text(encoding="utf-8")
    for split in ("hippocampus_validation", "openkbp_validation_12"):
        measured = meta["eval_metrics"][split]
        assert measured["targets"] > 0 and abs(measured["dice@5"] - measured["dice@1"] - measured["gain_1_to_5"]) < 1e-3
        for key in ("dice@1", "dice@5", "dice@10"):
            assert f"{measured[key]:.3f}" in card, (split, key, "not in the model card's table")
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    for t in (image, pred):
        assert t["num_channels"] == 1
        assert t["spatial_shape"] == [64, 64, 64]  # the shipped sam_med3d_lite's window
        assert t["dtype"] == "float32"
        assert t["is_patch_data"] is True
    assert image["format"] == "magnitude"
    assert pred["format"] == "segmentation"
    # the zoo's conventions (as in its VISTA3D bundle): label values in channel_def, a value range, the apps
    assert pred["channel_def"] == {"0": "background", "1": "prompted object"} and pred["value_range"] == [0, 1]
    inference = json.loads((ROOT / "bundle" / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert image["value_range"] == inference["intensity_clamp_by_modality"]["CT"]  # the CT clamp before the z-score
    assert "monai-label" in meta["supported_apps"]


# (b) logging config -----------------------------------------------------------------------------


def test_logging_conf_loads():
    parser = configparser.ConfigParser(interpolation=None)
    assert parser.read(LOGGING_CONF, encoding="utf-8") == [str(LOGGING_CONF)]
    assert parser["logger_root"]["level"] == "INFO"

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        # disable_existing_loggers=False: do not silence loggers that other tests rely on
        logging.config.fileConfig(LOGGING_CONF, disable_existing_loggers=False)
        assert root.level == logging.INFO
        assert any(isinstance(h, logging.StreamHandler) for h in root.handlers)
        assert "%(asctime)s" in root.handlers[0].formatter._fmt
    finally:
        for h in root.handlers[:]:
            if h not in saved_handlers:
                root.removeHandler(h)
                h.close()
        for h in saved_handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved_level)


# (c) the schema copy is the one the metadata names ------------------------------------------------


def test_schema_copy_matches_metadata_url(meta, schema):
    url = meta["schema"]
    assert Path(urlparse(url).path).name == SCHEMA.name
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
    assert schema["$schema"] == "https://json-schema.org/draft/2019-09/schema"
    assert set(schema["required"]) >= {"schema", "version", "network_data_format"}
