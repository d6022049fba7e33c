"""Speed and memory of the network and the workflows on this machine: one table, ratios measured in the same run.

    python benchmarks/run.py                 # everything (several minutes on 2 cores)
    python benchmarks/run.py --only encoder  # one group: encoder, click, case, ct, onnx, training
                                             # ("shipped": the variant of bundle/models/model.pt)

Each figure is the median of several runs after a warm-up, with ``torch.set_num_threads(2)``; each row runs
in its own process, so that its peak resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
THREADS = 2


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def bench_encoder(mode: str, repeats: int) -> dict:
    """Released configuration, one 128^3 crop: ``fast-fp32``, ``fast-bf16`` or ``padded-fp32``."""
    from torch.utils.flop_counter import FlopCounterMode

    from custom.networks import build_sam_med3d

    fast, dtype = mode.split("-")
    network = build_sam_med3d("sam_med3d", fast_window_attention=fast == "fast").eval()
    image = torch.randn(1, 1, 128, 128, 128)

    def run():
        with torch.no_grad(), _autocast(dtype):
            network.encode(image)

    seconds = _median_seconds(run, repeats)
    with FlopCounterMode(display=False) as counter:
        run()
    return {"seconds": seconds, "gflop": counter.get_total_flops() / 1e9}


def _with_precomputed_masks(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``encoder`` whose attention masks are computed once and then reused: what remains of the
    bias's cost is the fused kernel's reading of a mask (and the padded key), not the mask's computation."""
    import copy

    copied = copy.deepcopy(encoder)
    for block in copied.blocks:
        compute, masks = block.attn._attention_mask, {}

        def cached(q, pad_q, grid, window, compute=compute, masks=masks):
            key = (tuple(q.shape), q.dtype, tuple(grid), tuple(window))
            if key not in masks:
                masks[key] = compute(q, pad_q, grid, window)
            return masks[key]

        block.attn._attention_mask = cached
    return copied


def bench_encoder_vs_vit(dtype: str, rounds: int) -> dict:
    """The encoder (released configuration, fast path, rel-pos tables of std 0.1 as trained ones) against a
    plain ViT-B of the same width over the same 512 tokens (12 blocks, 12 heads, no position bias, no neck),
    run alternately in one process so that both see the same machine: ``ratio`` is the median over rounds of
    encoder / ViT-B blocks (with its quartiles), ``ratio_embed`` of encoder / ViT-B with its patch embedding
    (16^3 patches of the same 128^3 crop, absolute position), ``ratio_masks_precomputed`` of the encoder
    with its masks computed once / ViT-B blocks: the share of the bias that its computation costs."""
    from custom.networks import build_sam_med3d
    from custom.networks.image_encoder import Block, PatchEmbed3D

    encoder = build_sam_med3d("sam_med3d").eval().image_encoder
    generator = torch.Generator().manual_seed(0)
    for name, parameter in encoder.named_parameters():
        if "rel_pos" in name:
            parameter.data.normal_(0, 0.1, generator=generator)
    precomputed = _with_precomputed_masks(encoder)
    blocks = torch.nn.Sequential(*(Block(768, 12, use_rel_pos=False, window_size=0) for _ in range(12))).eval()
    embed, position = PatchEmbed3D(16, 1, 768).eval(), torch.zeros(1, 8, 8, 8, 768)
    image, tokens = torch.randn(1, 1, 128, 128, 128), torch.randn(1, 8, 8, 8, 768)
    runs = {
        "encoder": lambda: encoder(image),
        "precomputed": lambda: precomputed(image),
        "blocks": lambda: blocks(tokens),
        "embed": lambda: blocks(embed(image) + position),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad(), _autocast(dtype):
        for run in runs.values():
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    ratio = [e / b for e, b in zip(times["encoder"], times["blocks"])]
    ratio_embed = [e / b for e, b in zip(times["encoder"], times["embed"])]
    ratio_precomputed = [e / b for e, b in zip(times["precomputed"], times["blocks"])]
    low, _, high = statistics.quantiles(ratio, n=4, method="inclusive")
    return {
        "seconds": statistics.median(times["encoder"]),
        "ratio": statistics.median(ratio),
        "ratio_quartiles": (low, high),
        "ratio_embed": statistics.median(ratio_embed),
        "ratio_masks_precomputed": statistics.median(ratio_precomputed),
        "note": f"ViT-B blocks {statistics.median(times['blocks']):.3f} s, with patch embedding "
        f"{statistics.median(times['embed']):.3f} s",
    }


def bench_bf16_error(fixture: str, repeats: int) -> dict:
    """bf16 autocast against float32 on the upstream fixture (``tests/data/upstream_parity``): the embedding's
    relative L2 and max-abs errors, and those of the upstream float64 result against float32."""
    from custom.networks import build_sam_med3d, load_weights

    folder = REPO / "tests" / "data" / fixture
    io = torch.load(folder / "upstream_tiny_io.pt", weights_only=True)
    overrides = dict(image_size=64, patch_size=8, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=3)
    network = build_sam_med3d("sam_med3d", encoder_global_attn_indexes=(1, 3), prompt_embed_dim=96, **overrides)
    load_weights(network.eval(), folder / "upstream_tiny.pth")
    with torch.no_grad():
        fp32 = network.encode(io["image"])
        started = time.perf_counter()
        with _autocast("bf16"):
            bf16 = network.encode(io["image"]).float()
        seconds = time.perf_counter() - started

    def errors(a, b):
        return (a - b).norm() / b.norm(), (a - b).abs().max() / b.abs().max()

    l2, peak = errors(bf16, fp32)
    l2_up, peak_up = errors(fp32, io["embedding"])
    return {
        "seconds": seconds,
        "note": f"bf16 vs fp32: {l2:.2e} rel L2, {peak:.2e} rel max; fp32 vs upstream: {l2_up:.1e} / {peak_up:.1e}",
    }


def bench_matmul(dtype: str, repeats: int) -> dict:
    """A large matmul: what this machine's matrix units reach."""
    n = 4096
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
    seconds = _median_seconds(lambda: a @ b, repeats)
    return {"seconds": seconds, "gflop": 2 * n**3 / 1e9}


def bench_click(dtype: str, repeats: int) -> dict:
    """One further click on a computed embedding: decode, upsample to 128^3, paste into the crop's volume."""
    from custom.networks import build_sam_med3d, upsample_logits

    network = build_sam_med3d("sam_med3d").eval()
    with torch.no_grad():
        embedding = network.encode(torch.randn(1, 1, 128, 128, 128))
    volume = torch.zeros(160, 160, 160)
    previous = torch.zeros(1, 1, 32, 32, 32)

    def run():
        with torch.no_grad(), _autocast(dtype):
            low_res, _ = network.decode(embedding, torch.tensor([[[64.0, 60, 70]]]), torch.tensor([[1]]), previous)
        volume[10:138, 20:148, 5:133] = upsample_logits(low_res.float(), (128, 128, 128))[0, 0]

    return {"seconds": _median_seconds(run, repeats)}


def bench_case(dtype: str, repeats: int) -> dict:
    """A CT-sized volume (512 x 512 x 100 at 0.8 x 0.8 x 5 mm, int16 .nii.gz) from file to saved mask, one
    click, one window, the released configuration, through ``bundle/configs/inference.json``.

    ``seconds`` is the workflow's run (read, resample, encode, decode, invert, write) with the network
    loaded, as in an interactive session; the start-up (config, network, 400 MB checkpoint) is reported apart.
    One window: random weights segment noise everywhere, which would make the object grow to the window cap.
    """
    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigWorkflow

    from custom.networks import build_sam_med3d, checkpoint_payload
    from custom.networks.checkpoint import save_atomic

    folder = Path(tempfile.mkdtemp())
    volume = np.random.default_rng(0).normal(0, 300, (512, 512, 100)).astype(np.int16)
    nib.Nifti1Image(volume, np.diag([0.8, 0.8, 5.0, 1.0])).to_filename(folder / "ct.nii.gz")
    save_atomic(checkpoint_payload(build_sam_med3d("sam_med3d")), folder / "model.pt")
    run_seconds, startup_seconds = [], []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        workflow = ConfigWorkflow(
            config_file=str(REPO / "bundle/configs/inference.json"),
            workflow_type="infer",
            bundle_root=str(REPO / "bundle"),
            network_name="sam_med3d",
            ckpt_path=str(folder / "model.pt"),
            output_dir=str(folder / "out"),
            autocast_dtype="bfloat16" if dtype == "bf16" else None,
            max_windows_per_object=1,
            input_dict={
                "image": str(folder / "ct.nii.gz"),
                "points": [[256, 256, 50]],
                "point_labels": [1],
                "modality": "CT",
            },
        )
        workflow.initialize()
        workflow.evaluator  # noqa: B018 - instantiates the network and loads the checkpoint before the clock
        startup_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        workflow.run()
        run_seconds.append(time.perf_counter() - started)
        workflow.finalize()
    if not list((folder / "out").rglob("*.nii.gz")):
        raise RuntimeError(f"no mask written under {folder / 'out'}")
    # the first repetition is the warm-up
    return {
        "seconds": statistics.median(run_seconds[1:]),
        "note": f"start-up {statistics.median(startup_seconds[1:]):.2f} s",
    }


CT_SHAPE, CT_SPACING = (512, 512, 300), (0.8, 0.8, 1.5)


def synthetic_ct() -> tuple[Path, Path, list[dict]]:
    """A 512 x 512 x 300 CT at 0.8 x 0.8 x 1.5 mm (int16 HU, .nii.gz) with five labelled objects of the sizes
    seen in abdominal CT (a liver-sized ellipsoid longer than a window, a kidney, a spleen, a 12 mm lesion, a
    200 mm tube), written once to the temporary folder; returns the image, the label and one click per object."""
    import nibabel as nib
    import numpy as np

    folder = Path(tempfile.gettempdir()) / "sam_med3d_benchmark_ct"
    image_path, label_path = folder / "ct.nii.gz", folder / "ct_label.nii.gz"
    # centre (voxels), semi-axes (mm), HU
    objects = [
        ((300, 220, 150), (90, 70, 80), 60),
        ((150, 300, 130), (30, 25, 50), 30),
        ((380, 330, 170), (45, 35, 50), 45),
        ((200, 180, 200), (6, 6, 6), 90),
        ((256, 256, 150), (10, 10, 100), 150),
    ]
    clicks = [{"label": i + 1, "points": [list(c)], "point_labels": [1]} for i, (c, _, _) in enumerate(objects)]
    if image_path.is_file() and label_path.is_file():
        return image_path, label_path, clicks
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = rng.normal(-50, 40, CT_SHAPE).astype(np.int16)
    label = np.zeros(CT_SHAPE, np.uint8)
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(CT_SHAPE, CT_SPACING)]
    for index, (centre, radii, hu) in enumerate(objects, start=1):
        lo = [max(int(c - r / s) - 1, 0) for c, r, s in zip(centre, radii, CT_SPACING)]
        hi = [min(int(c + r / s) + 2, n) for c, r, s, n in zip(centre, radii, CT_SPACING, CT_SHAPE)]
        d, h, w = (
            ((a[lo_:hi_] - c * s) / r) ** 2 for a, lo_, hi_, c, s, r in zip(axes, lo, hi, centre, CT_SPACING, radii)
        )
        inside = d[:, None, None] + h[None, :, None] + w[None, None, :] <= 1
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        label[box][inside] = index
        image[box][inside] += np.int16(hu + 50)
    affine = np.diag([*CT_SPACING, 1.0])
    nib.Nifti1Image(image, affine).to_filename(image_path)
    nib.Nifti1Image(label, affine).to_filename(label_path)
    return image_path, label_path, clicks


def shipped_network_name() -> str:
    """The variant of ``bundle/models/model.pt``, as ``metadata.json`` names it."""
    return json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())["network_name"]


def _checkpoint(name: str, folder: Path) -> Path:
    """The shipped model for its variant, random weights (written once) for other variants."""
    from custom.networks import build_sam_med3d, checkpoint_payload
    from custom.networks.checkpoint import save_atomic

    if name == shipped_network_name():
        return REPO / "bundle" / "models" / "model.pt"
    path = folder / f"{name}.pt"
    if not path.is_file():
        save_atomic(checkpoint_payload(build_sam_med3d(name)), path)
    return path


def bench_ct_inference(name: str, repeats: int) -> dict:
    """``inference.json`` on the synthetic CT, five objects, one click each: file to saved label map."""
    from monai.bundle import ConfigWorkflow

    image, _, clicks = synthetic_ct()
    out = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=str(REPO / "bundle/configs/inference.json"),
        workflow_type="infer",
        bundle_root=str(REPO / "bundle"),
        network_name=name,
        ckpt_path=str(_checkpoint(name, image.parent)),
        output_dir=str(out),
        input_dict={"image": str(image), "objects": clicks, "modality": "CT"},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    report = json.loads(next(out.rglob("*.json")).read_text())
    windows = sum(len(o["windows"]) for o in report["objects"])
    return {"seconds": time.perf_counter() - started, "note": f"{windows} windows for 5 objects"}


def bench_ct_evaluation(name: str, repeats: int) -> dict:
    """``evaluate.json`` on the synthetic CT: 5 targets x 10 uniform clicks, the whole case."""
    from monai.bundle import ConfigWorkflow

    image, label, _ = synthetic_ct()
    folder = Path(tempfile.mkdtemp())
    datalist = folder / "dataset.json"
    datalist.write_text(
        json.dumps({"modality": {"0": "CT"}, "validation": [{"image": str(image), "label": str(label)}]})
    )
    started = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=str(REPO / "bundle/configs/evaluate.json"),
        workflow_type="infer",
        bundle_root=str(REPO / "bundle"),
        network_name=name,
        ckpt_path=str(_checkpoint(name, image.parent)),
        datalist=str(datalist),
        output_dir=str(folder / "eval"),
        num_clicks=10,
        **{"report#progress": False},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    timing = summary["seconds_per_click"]
    return {
        "seconds": time.perf_counter() - started,
        "note": f"{timing['clicks']} clicks, median {timing['median'] * 1000:.0f} ms per click",
    }


def bench_ct_first_click(name: str, repeats: int) -> dict:
    """The first click on the synthetic CT (512 x 512 x 300), from a loaded image to its mask on the stored grid:
    ``set_image`` (clamp, orientation, resampling to the network grid) and the click (one window encoded, one
    prompt step, growth, paste-back), median over the five objects, each on a freshly set image; reading the file
    is timed apart."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    from custom.networks import build_sam_med3d, load_weights
    from custom.predictor import VolumetricPredictor

    image_path, _, clicks = synthetic_ct()
    network = build_sam_med3d(name).eval()
    load_weights(network, _checkpoint(name, image_path.parent))
    predictor = VolumetricPredictor(network, intensity_clamp_by_modality={"CT": (-1000, 1000)})
    started = time.perf_counter()
    image = EnsureChannelFirst()(LoadImage(image_only=True)(str(image_path)))
    load = time.perf_counter() - started
    seconds, windows = [], []
    for obj in [None] + clicks:  # the first pass warms up
        started = time.perf_counter()
        predictor.set_image(image, modality="CT")
        if obj is not None:
            predictor.add_click(obj["label"], obj["points"][0], True)
            seconds.append(time.perf_counter() - started)
            windows.append(len(predictor.report(obj["label"])["windows"]))
    return {
        "seconds": statistics.median(seconds),
        "note": f"reading the file {load:.2f} s; {min(seconds):.2f}-{max(seconds):.2f} s; windows {windows}",
    }


def bench_ct_resample(name: str, repeats: int) -> dict:
    """Resampling the synthetic CT (512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm) to the network's 1.5 mm grid, image
    (bilinear) and label map (nearest): ``AxisAlignedSpacingd`` against MONAI's ``Spacingd`` with its defaults
    (float64 sampling), medians in one process; the largest difference of the images is reported and the label
    maps must be equal (float32 sampling rounds some exact ties the other way)."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Spacingd

    from custom.spacing import AxisAlignedSpacingd

    image, label, _ = synthetic_ct()
    data = EnsureChannelFirstd(["image", "label"])(LoadImaged(["image", "label"])({"image": image, "label": label}))
    modes = ["bilinear", "nearest"]
    ours = AxisAlignedSpacingd(["image", "label"], 1.5, mode=modes)
    monai = Spacingd(["image", "label"], 1.5, mode=modes)
    fast = _median_seconds(lambda: ours(data), repeats)
    reference = _median_seconds(lambda: monai(data), repeats)
    a, b = ours(data), monai(data)
    if not torch.equal(a["label"].as_tensor(), b["label"].as_tensor().to(a["label"].dtype)):
        raise RuntimeError("the label maps differ from Spacingd's")
    difference = float((a["image"].as_tensor() - b["image"].as_tensor()).abs().max())
    return {
        "seconds": fast,
        "note": f"Spacingd {reference:.2f} s: {reference / fast:.1f}x; largest image difference {difference:.1e} HU",
    }


def bench_ct_click(name: str, repeats: int) -> dict:
    """One further click on an object of the synthetic CT through the predictor, from the call to the updated
    mask on the stored grid (the first click, which encodes the window, excluded): median of the clicks that
    opened no window, with the time of those that did reported apart."""
    import nibabel as nib
    import numpy as np

    from custom.interaction import simulate_interaction
    from custom.networks import build_sam_med3d, load_weights
    from custom.predictor import VolumetricPredictor
    from custom.seeding import seeded_generator

    image, label, _ = synthetic_ct()
    network = build_sam_med3d(name).eval()
    load_weights(network, _checkpoint(name, image.parent))
    predictor = VolumetricPredictor(network, intensity_clamp_by_modality={"CT": (-1000, 1000)})
    predictor.set_image(str(image), modality="CT")
    truth_map = torch.as_tensor(np.asarray(nib.load(label).dataobj, dtype=np.uint8))
    quiet, opening = [], []
    for target in (2, 3, 1):  # a kidney, a spleen, the liver
        windows = 0
        steps = simulate_interaction(
            predictor, target, truth_map == target, repeats + 1, "uniform", seeded_generator(target)
        )
        for step in steps:
            opened = predictor.report(target)["windows_encoded"] > windows
            windows = predictor.report(target)["windows_encoded"]
            if step.point is not None and step.index > 1:  # the first click of a target pays for its embedding
                (opening if opened else quiet).append(step.seconds)
    note = f"{len(quiet)} clicks; {len(opening)} opened windows"
    if opening:
        note += f" ({statistics.median(opening):.2f} s median)"
    return {"seconds": statistics.median(quiet) if quiet else float("nan"), "note": note}


def bench_onnx(name: str, repeats: int) -> dict:
    """onnxruntime (CPU, ``bundle/scripts/export.py --format onnx``) against eager torch for one variant: the
    encoder of one window and one prompt step, medians; and the largest relative difference of their outputs."""
    import numpy as np
    import onnxruntime as ort

    from custom.networks import build_sam_med3d, load_weights
    from custom.networks.export import export_onnx

    network = build_sam_med3d(name).eval()
    if name == "sam_med3d_lite":
        load_weights(network, REPO / "bundle" / "models" / "model.pt")
    folder = Path(tempfile.mkdtemp())
    encode_path, prompt_path = export_onnx(network, folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    encode = ort.InferenceSession(str(encode_path), options, providers=["CPUExecutionProvider"])
    prompt = ort.InferenceSession(str(prompt_path), options, providers=["CPUExecutionProvider"])
    size = network.img_size
    image = torch.randn(1, 1, size, size, size)
    with torch.no_grad():
        embedding = network.encode(image)
    clicks, labels = torch.tensor([[[size / 2, size / 2 - 3, size / 2 + 2]]]), torch.tensor([[1]])
    low_res = torch.zeros(1, 1, *[4 * g for g in embedding.shape[2:]])
    feeds = {
        "embedding": embedding.numpy(),
        "point_coords": clicks.numpy(),
        "point_labels": labels.numpy(),
        "mask_input": low_res.numpy(),
    }

    def torch_encode():
        with torch.no_grad():
            return network.encode(image)

    def torch_prompt():
        with torch.no_grad():
            return network.decode(embedding, clicks, labels, low_res)[0]

    times = {
        "torch_encode": _median_seconds(torch_encode, repeats),
        "onnx_encode": _median_seconds(lambda: encode.run(None, {"image": image.numpy()}), repeats),
        "torch_prompt": _median_seconds(torch_prompt, 5 * repeats),
        "onnx_prompt": _median_seconds(lambda: prompt.run(None, feeds), 5 * repeats),
    }
    error_encode = np.abs(encode.run(None, {"image": image.numpy()})[0] - embedding.numpy()).max()
    error_prompt = np.abs(prompt.run(None, feeds)[0] - torch_prompt().numpy()).max()
    return {
        "seconds": times["onnx_encode"],
        "note": "encode torch {torch_encode:.3f} s / onnxruntime {onnx_encode:.3f} s; prompt step torch "
        "{torch_prompt:.4f} s / onnxruntime {onnx_prompt:.4f} s".format(**times)
        + f"; max rel. diff {error_encode / np.abs(embedding.numpy()).max():.1e} / "
        f"{error_prompt / np.abs(torch_prompt().numpy()).max():.1e}",
    }


def bench_training(spec: str, repeats: int) -> dict:
    """Training steps per second (11 click steps, batch 2, the variant's window): ``<network>-<fp32|bf16>``, on
    CUDA when there is one (then with its peak memory), else on this CPU."""
    from monai.losses import DiceCELoss

    from custom.engines import InteractiveSegmentation, parameter_groups, trainable
    from custom.networks import build_sam_med3d

    name, dtype = spec.rsplit("-", 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = trainable(build_sam_med3d(name)).to(device)
    size = network.img_size
    model = InteractiveSegmentation(network)
    optimizer = torch.optim.AdamW(parameter_groups(network, 1e-4), weight_decay=0.1)
    loss_function = DiceCELoss(sigmoid=True, squared_pred=True)
    image = torch.randn(2, 1, size, size, size, device=device)
    target = torch.zeros(2, 1, size, size, size, device=device)
    target[:, :, size // 4 : size // 2, size // 4 : size // 2, size // 4 : size // 2] = 1

    def step():
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(image, target, torch.Generator().manual_seed(0))
        loss = sum(loss_function(step_logits.float(), target) for step_logits in logits)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = _median_seconds(step, repeats)
    result = {"seconds": seconds, "steps_per_second": 1 / seconds}
    if device.type == "cuda":
        result["note"] = f"{torch.cuda.get_device_name()}, {torch.cuda.max_memory_allocated() / 2**30:.1f} GB peak"
    return result


ROWS = {
    "encoder": [
        ("encoder", "fast-fp32", 3),
        ("encoder", "fast-bf16", 3),
        ("encoder", "padded-fp32", 2),
        ("encoder_vs_vit_b", "fp32", 15),
        ("encoder_vs_vit_b", "bf16", 15),
        ("bf16_error", "upstream_parity", 1),
        ("matmul", "fp32", 5),
        ("matmul", "bf16", 5),
    ],
    "click": [("click", "fp32", 10), ("click", "bf16", 10)],
    "case": [("case", "fp32", 2), ("case", "bf16", 2)],
    "onnx": [("onnx", "sam_med3d_lite", 5), ("onnx", "sam_med3d", 3)],
    "ct": [
        ("ct_resample", "shipped", 3),
        ("ct_first_click", "shipped", 1),
        ("ct_click", "shipped", 9),
        ("ct_inference", "shipped", 1),
        ("ct_evaluation", "shipped", 1),
        ("ct_click", "sam_med3d", 9),
    ],
    "training": [
        ("training", "sam_med3d_lite-fp32", 3),
        ("training", "sam_med3d_lite-bf16", 3),
        ("training", "sam_med3d_small-fp32", 2),
        ("training", "sam_med3d_small-bf16", 2),
        ("training", "sam_med3d-fp32", 2),
        ("training", "sam_med3d-bf16", 2),
    ],
}
BENCHES = {
    "encoder": bench_encoder,
    "encoder_vs_vit_b": bench_encoder_vs_vit,
    "matmul": bench_matmul,
    "bf16_error": bench_bf16_error,
    "click": bench_click,
    "case": bench_case,
    "training": bench_training,
    "onnx": bench_onnx,
    "ct_inference": bench_ct_inference,
    "ct_evaluation": bench_ct_evaluation,
    "ct_click": bench_ct_click,
    "ct_first_click": bench_ct_first_click,
    "ct_resample": bench_ct_resample,
}


def _child(kind: str, spec: str, repeats: int) -> None:
    torch.set_num_threads(THREADS)
    result = BENCHES[kind](shipped_network_name() if spec == "shipped" else spec, repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(ROWS), action="append")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    results = {}
    for group in args.only or list(ROWS):
        for kind, spec, repeats in ROWS[group]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, spec, str(repeats)],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if out.returncode:
                print(f"{kind} {spec} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[(kind, spec)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{'measurement':<34}{'seconds':>10}{'GFLOP/s':>10}{'peak MB':>10}  note")
    for (kind, spec), r in results.items():
        gflops = f"{r['gflop'] / r['seconds']:>10.1f}" if "gflop" in r else f"{'':>10}"
        note = f"{r['steps_per_second']:.3f} steps/s " if "steps_per_second" in r else ""
        note += r.get("note", "")
        print(f"{kind + ' ' + spec:<34}{r['seconds']:>10.3f}{gflops}{r['peak_rss_mb']:>10.0f}  {note}")
    padded, fast = results.get(("encoder", "padded-fp32")), results.get(("encoder", "fast-fp32"))
    if padded and fast:
        print(f"\nencoder padded/fast (fp32, same run): {padded['seconds'] / fast['seconds']:.2f}x")
    bf16 = results.get(("encoder", "fast-bf16"))
    if bf16 and fast:
        print(f"encoder fast fp32/bf16: {fast['seconds'] / bf16['seconds']:.2f}x")
    for dtype in ("fp32", "bf16"):
        pair = results.get(("encoder_vs_vit_b", dtype))
        if pair:
            low, high = pair["ratio_quartiles"]
            print(
                f"encoder / plain ViT-B blocks ({dtype}, alternating in one process): {pair['ratio']:.2f}x "
                f"(quartiles {low:.2f}-{high:.2f}); / ViT-B with its patch embedding: {pair['ratio_embed']:.2f}x; "
                f"with every mask precomputed: {pair['ratio_masks_precomputed']:.2f}x"
            )
    for dtype in ("fp32", "bf16"):
        encoder, matmul = results.get(("encoder", f"fast-{dtype}")), results.get(("matmul", dtype))
        if encoder and matmul:
            share = (encoder["gflop"] / encoder["seconds"]) / (matmul["gflop"] / matmul["seconds"])
            print(f"encoder {dtype} GFLOP/s vs 4096^3 matmul {dtype}: {share:.0%}")


if __name__ == "__main__":
    main()
