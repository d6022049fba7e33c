"""The bundle as others meet it: the zoo-layout package (offline model-zoo checks, a fresh virtual environment),
property checks, MLflow tracking, MONAI Label's real server, and ONNX for CPU deployment."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, randomize_
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

BUNDLE = REPO_ROOT / "bundle"
SCHEMA = REPO_ROOT / "tests" / "data" / "meta_schema_20240725.json"
SAMPLE = BUNDLE / "sample" / "images" / "openkbp_pt_243.nii.gz"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, str(BUNDLE / "scripts/package.py"), "--output_dir", str(out)], check=True)
    return out / "sam_med3d"


def test_the_package_passes_the_offline_model_zoo_checks(package):
    for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (package / required).is_file(), required
    assert (package / "custom" / "predictor.py").is_file() and not list(package.rglob("__pycache__"))
    metadata = json.loads((package / "configs/metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    verify_metadata(meta_file=str(package / "configs/metadata.json"), filepath=str(SCHEMA))
    for config in (package / "configs").glob("*.json"):
        content = json.loads(config.read_text())
        assert content.get("bundle_root", ".") == ".", config.name
    with zipfile.ZipFile(package.parent / "sam_med3d.zip") as archive:
        names = set(archive.namelist())
    assert {"sam_med3d/LICENSE", "sam_med3d/custom/predictor.py", "sam_med3d/models/model.pt"} <= names
    # verify_net_in_out from inside the package, the network built from the package's own code
    here = os.getcwd()
    os.chdir(package)
    sys.path.insert(0, str(package))
    try:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(package / "configs/metadata.json"),
            config_file=str(package / "configs/inference.json"),
            bundle_root=str(package),
        )
    finally:
        sys.path.remove(str(package))
        os.chdir(here)


def test_monai_bundle_load_returns_the_shipped_weights(package, monkeypatch, tmp_path):
    """What a zoo user calls: ``monai.bundle.load`` on the packaged bundle builds the network from inference.json
    and copies every shipped tensor into it (a nested file would leave it randomly initialised: '0 of N')."""
    import monai.bundle

    # a copy: initialising the inference workflow creates its output folder inside the bundle folder
    package = Path(shutil.copytree(package, tmp_path / package.name))
    monkeypatch.chdir(package)  # the package's configs name their files relative to the bundle folder
    loaded = monai.bundle.load(
        name=package.name, bundle_dir=str(package.parent), workflow_type="inference", device="cpu"
    )
    stored = torch.load(package / "models" / "model.pt", weights_only=True)
    state = loaded.state_dict()
    assert set(state) == set(stored)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor.to(state[key].dtype)), key


def test_required_packages_are_what_the_code_imports_and_what_is_installed():
    metadata = json.loads((BUNDLE / "configs/metadata.json").read_text())
    required = metadata["required_packages_version"]
    for package_name, pinned in required.items():
        assert version(package_name) == pinned, package_name
    assert version("monai") == metadata["monai_version"] and version("numpy") == metadata["numpy_version"]
    assert version("torch").split("+")[0] == metadata["pytorch_version"]
    provided = {"torch", "monai", "numpy", "nibabel", "ignite", "itk", "fire", "scipy", "tensorboard", "tqdm"}
    provided |= {"matplotlib", "highdicom", "pydicom"}
    imported = set()
    for source in list((REPO_ROOT / "custom").rglob("*.py")) + list((BUNDLE / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("custom", "__future__")}
    # onnx / onnxruntime are optional (export only); starlette only where MONAI Label serves (guarded import)
    assert third_party - {"onnx", "onnxruntime", "onnxscript", "starlette"} <= provided, third_party - provided


def test_train_and_infer_workflows_have_their_properties(tmp_path):
    for config, kind in (("train.json", "train"), ("inference.json", "infer")):
        workflow = ConfigWorkflow(
            config_file=str(BUNDLE / "configs" / config),
            meta_file=str(BUNDLE / "configs/metadata.json"),
            workflow_type=kind,
            output_dir=str(tmp_path / kind),
        )
        workflow.initialize()
        assert workflow.check_properties() == [], kind
        parser = workflow.parser
    train = json.loads((BUNDLE / "configs/train.json").read_text())
    assert isinstance(train["train"]["handlers"], list) and all(isinstance(h, dict) for h in train["train"]["handlers"])
    assert "inferer" in train["train"] and parser is not None


def test_property_checks_write_nothing_into_the_bundle(package, tmp_path, monkeypatch):
    """What the zoo's checks and ``monai.bundle.load`` do (initialize, then check the properties), run from inside
    the packaged bundle with the configs' default output folders, leaves the bundle folder as it was."""
    bundle = tmp_path / "sam_med3d"
    shutil.copytree(package, bundle)
    before = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*"))
    monkeypatch.chdir(bundle)
    monkeypatch.syspath_prepend(str(bundle))
    for config, kind in (("train.json", "train"), ("evaluate.json", "infer"), ("inference.json", "infer")):
        workflow = ConfigWorkflow(
            config_file=f"configs/{config}", meta_file="configs/metadata.json", workflow_type=kind, bundle_root="."
        )
        workflow.initialize()
        assert workflow.check_properties() == [], config
    after = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if "__pycache__" not in p.parts)
    assert after == before, set(after) ^ set(before)


@pytest.mark.slow
def test_ckpt_export_by_tracing_reproduces_the_eager_network(package, tmp_path):
    """``monai.bundle ckpt_export --use_trace True`` from the packaged bundle (TorchScript scripting is not supported,
    see the model card): the traced program gives the eager network's logits."""
    target = tmp_path / "model.ts"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "--net_id",
        "network_def",
        "--use_trace",
        "True",
        "--filepath",
        str(target),
        "--ckpt_file",
        "models/model.pt",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
    ]
    env = dict(os.environ, PYTHONPATH=str(package))
    result = subprocess.run(command, cwd=package, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    traced = torch.jit.load(str(target))
    from custom.networks import build_sam_med3d, load_weights

    metadata = json.loads((package / "configs/metadata.json").read_text())
    eager = build_sam_med3d(metadata["network_name"]).eval()
    load_weights(eager, package / "models/model.pt")
    image = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = eager(image), traced(image)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_mlflow_tracking_with_a_local_store(tmp_path):
    pytest.importorskip("mlflow")
    import mlflow
    from monai.utils import path_to_sqlite_uri

    store = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))  # a local file (MLflow 3 has no plain-file store)
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs/train.json"),
        workflow_type="train",
        output_dir=str(tmp_path / "run"),
        tracking="mlflow",
        tracking_uri=store,
        experiment_name="sam_med3d_test",
        network_name="sam_med3d_tiny",
        pretrained_ckpt=None,
        epochs=1,
        val_interval=1,
        num_workers=0,
        progress_bar=False,
        **{"network_def#image_size": 64},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("sam_med3d_test")
    runs = client.search_runs([experiment.experiment_id])
    metrics = set().union(*(run.data.metrics for run in runs))
    assert "train_loss" in metrics and "val_dice_5clicks" in metrics, metrics


def test_onnx_programs_match_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from custom.networks import build_sam_med3d
    from custom.networks.export import export_onnx

    network = randomize_(build_sam_med3d("sam_med3d_tiny", image_size=64), seed=9).eval()
    encode_path, prompt_path = export_onnx(network, tmp_path)
    encode = ort.InferenceSession(str(encode_path), providers=["CPUExecutionProvider"])
    prompt = ort.InferenceSession(str(prompt_path), providers=["CPUExecutionProvider"])
    image = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        embedding = network.encode(image)
        ours = encode.run(None, {"image": image.numpy()})[0]
        assert np.abs(ours - embedding.numpy()).max() <= 1e-4 * np.abs(embedding.numpy()).max()
        previous = torch.randn(1, 1, 16, 16, 16)
        for n in (1, 3, 7):  # the number of clicks is dynamic
            clicks, labels = 63 * torch.rand(1, n, 3), torch.randint(0, 2, (1, n))
            expected, _ = network.decode(embedding, clicks, labels, previous)
            inputs = {
                "embedding": embedding.numpy(),
                "point_coords": clicks.numpy(),
                "point_labels": labels.numpy(),
                "mask_input": previous.numpy(),
            }
            logits = prompt.run(None, inputs)[0]
            assert np.abs(logits - expected.numpy()).max() <= 1e-4 * np.abs(expected.numpy()).max(), n


def test_large_files_lists_the_shipped_model_with_its_hash(package):
    """``large_files.yml`` is packaged, and its ``hash_val`` for ``models/model.pt`` is the hash of the model in
    the repository and in the package (after replacing model.pt: ``python bundle/scripts/package.py
    --update_hashes``), as ``monai.bundle download_large_files`` checks it."""
    import yaml
    from monai.apps.utils import check_hash

    assert (package / "large_files.yml").read_text() == (BUNDLE / "large_files.yml").read_text()
    listed = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    entries = {entry["path"]: entry for entry in listed}
    model = entries["models/model.pt"]
    assert model["hash_type"] == "sha256"
    for root in (BUNDLE, package):
        digest = hashlib.sha256((root / "models/model.pt").read_bytes()).hexdigest()
        assert digest == model["hash_val"], f"{root}: refresh with python bundle/scripts/package.py --update_hashes"
        assert check_hash(root / "models/model.pt", model["hash_val"], model["hash_type"])
    assert entries["models/sam_med3d_turbo.pth"]["url"].startswith("https://huggingface.co/blueyo0/SAM-Med3D/")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchvision_stand_in(folder: Path) -> Path:
    """torchvision does not import beside this torch build ('operator torchvision::nms does not exist'), and
    MONAI Label imports torchvision.utils when it starts (for 2D pathology previews, never on this path).

    The folder also gets a ``sitecustomize`` that hides an editable install of this project (``pip install -e
    .``), so that the server can only run the packaged bundle's own ``custom``."""
    package = folder / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Stand-in for MONAI Label\'s start-up import."""\n')
    (package / "utils.py").write_text(
        "def make_grid(*args, **kwargs):\n    raise NotImplementedError('torchvision stand-in')\n\n\n"
        "def save_image(*args, **kwargs):\n    raise NotImplementedError('torchvision stand-in')\n"
    )
    (folder / "sitecustomize.py").write_text(
        "import sys\n\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
    )
    return folder


@contextlib.contextmanager
def _monai_label_server(app: Path, studies: Path, conf: dict[str, str], tmp_path: Path):
    """A MONAI Label server on loopback (``python -m monailabel.main start_server``); yields its port and log."""
    # The installed distribution, not find_spec: the bundle's own app folder (bundle/monailabel, a namespace
    # package without __init__.py) is found by that name wherever the repository or the bundle is on the path.
    try:
        version("monailabel")
    except PackageNotFoundError:
        pytest.skip("monailabel is not installed: the README's test command installs it")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(_torchvision_stand_in(tmp_path / "shim")))
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
    for name, value in conf.items():
        command += ["--conf", name, value]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None, log_path.read_text()[-3000:]
                time.sleep(1)
        yield port, log_path
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _info(port: int) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=30).read())


def _infer(port: int, model: str, params: dict, output: str, target: Path) -> tuple[int, float]:
    """POST /infer/<model> for the sample as curl sends it; returns the HTTP status and the seconds taken."""
    started = time.perf_counter()
    result = subprocess.run(
        [
            "curl",
            "-s",
            "-X",
            "POST",
            f"http://127.0.0.1:{port}/infer/{model}?image=openkbp_pt_243&output={output}",
            "-F",
            "params=" + json.dumps(params),
            "-o",
            str(target),
            "-w",
            "%{http_code}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return int(result.stdout or 0), time.perf_counter() - started


def _studies(tmp_path: Path) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / SAMPLE.name).write_bytes(SAMPLE.read_bytes())
    return studies


@pytest.mark.slow
def test_monai_label_serves_the_bundle(package, tmp_path):
    """The project's own app, from the packaged bundle alone: clicks in, label map out; label names and values
    from the label table; one predictor per image kept across requests; no clicks -> 422."""
    click, further = [69, 64, 33], [69, 64, 36]  # voxel indices of the stored image: inside the brainstem
    table = json.loads((package / "docs" / "labels.json").read_text())["labels"]
    conf = {"bundle": str(package)}
    with _monai_label_server(package / "monailabel", _studies(tmp_path), conf, tmp_path) as (port, log):
        info = _info(port)
        assert "sam_med3d" in info["models"], log.read_text()[-3000:]
        model = info["models"]["sam_med3d"]
        assert model["type"] == "deepedit"
        assert model["labels"] == {entry["name"]: entry["value"] for entry in table}
        assert "sam_med3d" in info["trainers"]
        assert f"the bundle's code: {package / 'custom'}" in log.read_text()

        params = {"foreground": [click], "background": []}
        status, first = _infer(port, "sam_med3d", params, "image", tmp_path / "label.nii.gz")
        assert status == 200, log.read_text()[-3000:]
        params = {"foreground": [click, further], "background": []}
        status, again = _infer(port, "sam_med3d", params, "json", tmp_path / "further.json")
        assert status == 200, log.read_text()[-3000:]
        answer = json.loads((tmp_path / "further.json").read_text())
        print(f"MONAI Label request times: first click {first:.2f} s, further click {again:.2f} s")
        assert answer["predictor"] == {"reused": True, "embeddings_computed": 0}  # the image was not re-encoded
        assert again < max(0.5 * first, 1.0), (first, again)
        assert answer["label_names"] == {"foreground": 1}
        value, *centre = answer["centroids"]["label_1"]
        assert int(value) == 1 and len(centre) == 3

        name = next(entry["name"] for entry in table if entry["value"] == 1)
        status, _ = _infer(port, "sam_med3d", {name: [click], "background": []}, "json", tmp_path / "named.json")
        assert status == 200 and json.loads((tmp_path / "named.json").read_text())["label_names"] == {name: 1}

        status, _ = _infer(port, "sam_med3d", {}, "json", tmp_path / "none.json")
        assert status == 422, (tmp_path / "none.json").read_text()
        assert "no clicks" in json.loads((tmp_path / "none.json").read_text())["detail"]
    label, source = nib.load(tmp_path / "label.nii.gz"), nib.load(SAMPLE)
    mask = np.asarray(label.dataobj)
    assert mask.shape == source.shape
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    assert mask[tuple(click)] > 0 and 100 < (mask > 0).sum() < 0.05 * mask.size
    assert set(np.unique(mask)) == {0, 1}  # the value the answer's label_names give
    assert not (package / "eval").exists()  # the bundle's own saver is left to MONAI Label's writer


@pytest.mark.slow
def test_the_monai_label_train_task_fine_tunes_the_bundle_and_the_infer_task_uses_it(package, tmp_path):
    """POST /train through the real server on the sample with its label: one epoch of the bundle's train.json in
    its own run folder, the kept weights become models/model.pt (the earlier one kept beside it), and the next
    click request answers with them."""
    bundle = tmp_path / "sam_med3d"
    shutil.copytree(package, bundle)
    studies = _studies(tmp_path)
    (studies / "labels" / "final").mkdir(parents=True)
    (studies / "labels" / "final" / SAMPLE.name).write_bytes((BUNDLE / "sample" / "labels" / SAMPLE.name).read_bytes())
    shipped = (bundle / "models" / "model.pt").read_bytes()
    conf = {"bundle": str(bundle)}
    with _monai_label_server(bundle / "monailabel", studies, conf, tmp_path) as (port, log):
        params = {"max_epochs": 1, "val_split": 0.0, "device": "cpu", "multi_gpu": False, "num_workers": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/train/sam_med3d?run_sync=true",
            data=json.dumps(params).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=900).read()
        runs = list((bundle / "runs").iterdir())
        assert len(runs) == 1 and (runs[0] / "model.pt").is_file(), log.read_text()[-3000:]
        assert (bundle / "models" / "model.pt").read_bytes() == (runs[0] / "model.pt").read_bytes()
        assert (bundle / "models" / f"model_before_{runs[0].name}.pt").read_bytes() == shipped
        status, _ = _infer(
            port, "sam_med3d", {"foreground": [[69, 64, 33]], "background": []}, "json", tmp_path / "after.json"
        )
        assert status == 200, log.read_text()[-3000:]
        assert f"{bundle / 'models' / 'model.pt'}" in log.read_text()


@pytest.mark.slow
def test_the_stock_monaibundle_app_serves_the_bundle_as_deepedit(tmp_path):
    """MONAI Label's own ``monaibundle`` app reads a bundle's type from its folder name only: packaged as
    ``sam_med3d_deepedit`` into the app's ``model/`` folder it is a deepedit (click) model."""
    stock = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    if not stock.is_dir():
        pytest.skip(f"MONAI Label's sample apps are not installed ({stock})")
    app = tmp_path / "monaibundle"
    shutil.copytree(stock, app, ignore=shutil.ignore_patterns("__pycache__"))
    package = [sys.executable, str(BUNDLE / "scripts/package.py"), "--output_dir", str(app / "model")]
    subprocess.run(package + ["--name", "sam_med3d_deepedit", "--make_zip", "False"], check=True)
    conf = {"models": "sam_med3d_deepedit", "zoo_source": "local", "sam2": "false", "skip_trainers": "true"}
    with _monai_label_server(app, _studies(tmp_path), conf, tmp_path) as (port, log):
        models = _info(port)["models"]
        assert models["sam_med3d_deepedit"]["type"] == "deepedit", log.read_text()[-3000:]
        click = [69, 64, 33]
        params = {"foreground": [click], "background": []}
        status, _ = _infer(port, "sam_med3d_deepedit", params, "image", tmp_path / "label.nii.gz")
        assert status == 200, log.read_text()[-3000:]
        # what 3D Slicer's auto-segment sends (the app's automatic "_seg" task) and a click request without clicks:
        # a client error that names the problem, not a server error
        for model, no_clicks in (
            ("sam_med3d_deepedit_seg", {}),
            ("sam_med3d_deepedit", {"foreground": [], "background": []}),
        ):
            answer = tmp_path / f"{model}.json"
            status, _ = _infer(port, model, no_clicks, "image", answer)
            assert status == 422, (model, status, log.read_text()[-3000:])
            assert "no click" in answer.read_text(), answer.read_text()
    mask = np.asarray(nib.load(tmp_path / "label.nii.gz").dataobj)
    assert mask[tuple(click)] > 0 and 100 < (mask > 0).sum() < 0.05 * mask.size


@pytest.mark.slow
def test_the_package_runs_in_a_fresh_virtual_environment(package, tmp_path):
    """Only the bundle's declared packages, not this project: the default inference from inside the folder."""
    metadata = json.loads((package / "configs/metadata.json").read_text())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={metadata['pytorch_version']}"], check=True, timeout=900)
    pins = [f"monai=={metadata['monai_version']}", f"numpy=={metadata['numpy_version']}"]
    pins += [f"{name}=={pinned}" for name, pinned in metadata["required_packages_version"].items()]
    subprocess.run(pip + pins, check=True, timeout=900)
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('custom') is None)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "True"  # nothing of this project outside the package
    run = subprocess.run(
        [python, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"],
        capture_output=True,
        text=True,
        cwd=package,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    mask = nib.load(package / "eval" / "openkbp_pt_243" / "openkbp_pt_243_seg.nii.gz")
    assert mask.shape == nib.load(SAMPLE).shape and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3, 4, 7}
