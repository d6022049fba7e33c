"""The predictor cache of interactive servers (:class:`custom.inferer.PredictorCache` behind a
:class:`custom.inferer.PromptedInferer`): one predictor per image file, found again by (real path, mtime, size),
modality, network object and inferer settings, so that a further click on the same image is not re-encoded;
objects given only new clicks continue and others start again; least recently used images dropped first;
images without a file, failed requests and a cleared cache not kept; one call at a time through a cache.

A small SAM-Med3D with random weights (``SMALL_SETTINGS``, 64^3 windows) is the network; its ``encode`` and
``decode`` are wrapped to count the encoder and prompt steps. The volumes (40^3 at 1.5 mm) fit in one window, so
each new image costs exactly one encoder pass.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import SMALL_SETTINGS, randomize_
from monai.data import MetaTensor

from custom.inferer import PredictorCache, PromptedInferer
from custom.networks import build_sam_med3d
from custom.object_prompts import ObjectPrompts
from custom.predictor import VolumetricPredictor
from custom.transforms import PROMPT_REPORT

SHAPE = (40, 40, 40)
SPACING = 1.5
AFFINE = np.diag([SPACING] * 3 + [1.0])
Click = tuple[tuple[int, int, int], bool]
P1: Click = ((20, 20, 20), True)
P2: Click = ((24, 18, 21), True)
P3: Click = ((12, 25, 20), False)


@dataclass
class Calls:
    """How often the wrapped network was asked to encode a window and to run a prompt step."""

    encode: int = 0
    decode: int = 0


def _network(seed: int = 0) -> tuple[torch.nn.Module, Calls]:
    """A small SAM-Med3D whose ``encode`` and ``decode`` calls are counted (seeded: the same weights every run)."""
    torch.manual_seed(seed)
    network = randomize_(build_sam_med3d("sam_med3d", **SMALL_SETTINGS), seed=seed).eval()
    calls = Calls()
    encode, decode = network.encode, network.decode

    def counted_encode(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.encode += 1
        return encode(*args, **kwargs)

    def counted_decode(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.decode += 1
        return decode(*args, **kwargs)

    network.encode, network.decode = counted_encode, counted_decode
    return network, calls


def _volume(seed: int) -> np.ndarray:
    """Noise with a bright ball (not constant, different per seed)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    ball = np.linalg.norm(grid - np.asarray(SHAPE) / 2, axis=-1) < 8
    return (rng.normal(0.0, 20.0, SHAPE) + 300.0 * ball).astype(np.float32)


def _write(path: Path, seed: int) -> Path:
    nib.Nifti1Image(_volume(seed), AFFINE).to_filename(path)
    return path


def _batch(path: Path | None, seed: int = 0, affine: np.ndarray = AFFINE) -> MetaTensor:
    """A batch of one stored-grid volume as the bundle's pre-transforms leave it (its file in the metadata)."""
    meta = {} if path is None else {"filename_or_obj": str(path)}
    image = MetaTensor(torch.from_numpy(_volume(seed))[None, None], affine=torch.as_tensor(affine), meta=meta)
    image.is_batch = True
    return image


def _prompts(*objects: list[Click], labels: Sequence[int] | None = None) -> list[list[ObjectPrompts]]:
    """One volume's objects (labels 1, 2, ... unless given), each with its clicks."""
    labels = labels or range(1, len(objects) + 1)
    return [
        [
            ObjectPrompts(label, tuple((tuple(map(float, p)), bool(s)) for p, s in clicks))
            for label, clicks in zip(labels, objects)
        ]
    ]


def _segment(
    inferer: PromptedInferer, network: torch.nn.Module, image: MetaTensor, *objects: list[Click], **kwargs: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One request: the label map ``(D, H, W)`` and the volume's report."""
    result = inferer(image, network, _prompts(*objects), **kwargs)
    return result[0, 0].as_tensor(), json.loads(result.meta[PROMPT_REPORT][0])


def _kept_predictors(cache: PredictorCache) -> list[VolumetricPredictor]:
    return [kept.predictor for kept in cache._kept.values()]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_cache_keeps_at_least_one_image():
    with pytest.raises(ValueError, match="max_images"):
        PredictorCache(max_images=0)


def test_image_key_is_the_real_path_mtime_and_size_and_none_without_a_file(tmp_path):
    path = _write(tmp_path / "a.nii.gz", 0)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(path)
    stat = os.stat(path)
    assert PredictorCache.image_key(str(path)) == (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    assert PredictorCache.image_key(link) == PredictorCache.image_key(path)  # PathLike, through the link
    assert PredictorCache.image_key(tmp_path) is not None  # a folder (a DICOM series)
    for nothing in (None, "<image>", str(tmp_path / "missing.nii.gz"), torch.zeros(3)):
        assert PredictorCache.image_key(nothing) is None
    before = PredictorCache.image_key(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched (rewritten in place)
    assert PredictorCache.image_key(path) != before
    with open(path, "ab") as f:  # grown, same modification time
        f.write(b"\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert PredictorCache.image_key(path) == (before[0], before[1], before[2] + 1)


def test_a_further_click_on_the_same_image_reuses_the_predictor_without_encoding(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    image = _batch(_write(tmp_path / "a.nii.gz", 0))

    one_click, first = _segment(inferer, network, image, [P1])
    assert (calls.encode, calls.decode) == (1, 1)
    assert first["predictor_reused"] is False and first["embeddings_computed"] == 1
    assert len(cache) == 1 and (cache.hits, cache.misses) == (0, 1)
    [predictor] = _kept_predictors(cache)

    label_map, second = _segment(inferer, network, image, [P1, P2])  # the client sends every click again
    assert calls.encode == 1  # no encoder pass
    assert calls.decode == 2  # only the new click's prompt step, not a replay of P1
    assert second["predictor_reused"] is True and second["embeddings_computed"] == 0
    assert second["objects"][0]["clicks"] == 2 and second["objects"][0]["prompt_steps"] == 2
    [kept] = _kept_predictors(cache)
    assert kept is predictor and (cache.hits, cache.misses) == (1, 1)
    assert not torch.equal(label_map, one_click)  # the new click was applied

    # the same answer as a fresh predictor given both clicks
    expected, _ = _segment(PromptedInferer(), network, image, [P1, P2])
    assert torch.equal(label_map, expected)
    assert calls.encode == 2  # (the uncached inferer encodes the image itself)

    decoded = calls.decode
    again, same = _segment(inferer, network, image, [P1, P2])  # the same request again: nothing to do
    assert (calls.encode, calls.decode) == (2, decoded) and same["predictor_reused"] is True
    assert torch.equal(again, expected)


def test_the_same_file_through_a_symlink_is_the_same_image(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    path = _write(tmp_path / "a.nii.gz", 0)
    (tmp_path / "link.nii.gz").symlink_to(path)
    _segment(inferer, network, _batch(path), [P1])
    _, report = _segment(inferer, network, _batch(tmp_path / "link.nii.gz"), [P1, P2])
    assert report["predictor_reused"] is True and calls.encode == 1 and len(cache) == 1


def test_a_different_image_gets_a_new_predictor(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    _segment(inferer, network, _batch(_write(tmp_path / "a.nii.gz", 0), 0), [P1])
    _, report = _segment(inferer, network, _batch(_write(tmp_path / "b.nii.gz", 1), 1), [P1])
    assert report["predictor_reused"] is False and calls.encode == 2
    first, second = _kept_predictors(cache)
    assert first is not second and len(cache) == 2


def test_a_file_rewritten_in_place_is_a_new_image(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    path = _write(tmp_path / "a.nii.gz", 0)
    _segment(inferer, network, _batch(path, 0), [P1])
    mtime = os.stat(path).st_mtime_ns
    _write(path, 1)
    os.utime(path, ns=(mtime, mtime + 10**9))  # a later modification time whatever the file system's resolution
    _, report = _segment(inferer, network, _batch(path, 1), [P1, P2])
    assert report["predictor_reused"] is False and calls.encode == 2
    assert report["objects"][0]["clicks"] == 2  # both clicks given to the new predictor
    assert len(cache) == 2  # the stale entry stays until it is evicted


def test_the_least_recently_used_image_is_evicted(tmp_path):
    network, calls = _network()
    cache = PredictorCache(max_images=2)
    inferer = PromptedInferer(predictor_cache=cache)
    images = {name: _batch(_write(tmp_path / f"{name}.nii.gz", seed), seed) for seed, name in enumerate("abc")}

    for name in "aba":  # a used again after b: b is now the least recently used
        _segment(inferer, network, images[name], [P1])
    assert calls.encode == 2
    _segment(inferer, network, images["c"], [P1])
    assert calls.encode == 3 and len(cache) == 2

    _, report = _segment(inferer, network, images["a"], [P1, P2])  # kept
    assert report["predictor_reused"] is True and calls.encode == 3
    _, report = _segment(inferer, network, images["b"], [P1, P2])  # evicted: encoded again, every click replayed
    assert report["predictor_reused"] is False and calls.encode == 4
    assert report["objects"][0]["prompt_steps"] == 2
    _, report = _segment(inferer, network, images["c"], [P1])  # evicted by b (a was used after c)
    assert report["predictor_reused"] is False and calls.encode == 5 and len(cache) == 2


def test_one_kept_image_at_most(tmp_path):
    network, calls = _network()
    cache = PredictorCache(max_images=1)
    inferer = PromptedInferer(predictor_cache=cache)
    a, b = (_batch(_write(tmp_path / f"{n}.nii.gz", s), s) for s, n in enumerate("ab"))
    for image in (a, a, b, b, a):
        _segment(inferer, network, image, [P1])
    assert calls.encode == 3 and len(cache) == 1 and (cache.hits, cache.misses) == (2, 3)


def test_network_modality_and_settings_are_part_of_the_key(tmp_path):
    network, calls = _network()
    cache = PredictorCache(max_images=8)
    inferer = PromptedInferer(predictor_cache=cache)
    image = _batch(_write(tmp_path / "a.nii.gz", 0))
    _segment(inferer, network, image, [P1], modality="CT")

    other_network, other_calls = _network()  # MONAI Label builds a new network when model.pt changes
    _, report = _segment(inferer, other_network, image, [P1], modality="CT")
    assert report["predictor_reused"] is False and other_calls.encode == 1

    _, report = _segment(inferer, network, image, [P1], modality="MR")
    assert report["predictor_reused"] is False and calls.encode == 2

    other_settings = PromptedInferer(functools.partial(VolumetricPredictor, spacing_mm=2.0), predictor_cache=cache)
    _, report = _segment(other_settings, network, image, [P1], modality="CT")
    assert report["predictor_reused"] is False and calls.encode == 3
    equal_settings = PromptedInferer(functools.partial(VolumetricPredictor, spacing_mm=2.0), predictor_cache=cache)
    _, report = _segment(equal_settings, network, image, [P1, P2], modality="CT")  # as a config builds it again
    assert report["predictor_reused"] is True and calls.encode == 3

    same_settings = PromptedInferer(predictor_cache=cache)  # another inferer with equal settings shares it
    _, report = _segment(same_settings, network, image, [P1, P2], modality="CT")
    assert report["predictor_reused"] is True and calls.encode == 3
    assert len(cache) == 4


def test_clicks_taken_back_start_the_object_again_but_keep_the_embeddings(tmp_path):
    network, calls = _network()
    inferer = PromptedInferer(predictor_cache=PredictorCache())
    image = _batch(_write(tmp_path / "a.nii.gz", 0))
    _segment(inferer, network, image, [P1, P2, P3])
    assert (calls.encode, calls.decode) == (1, 3)

    label_map, report = _segment(inferer, network, image, [P1, P3])  # P2 undone
    assert calls.encode == 1  # the embedding stays
    assert calls.decode == 3 + 2  # the object replayed from scratch: both remaining clicks
    assert report["predictor_reused"] is True and report["objects"][0]["clicks"] == 2
    expected, _ = _segment(PromptedInferer(), network, image, [P1, P3])  # a new predictor, no cache
    assert torch.equal(label_map, expected)


def test_each_object_continues_or_starts_again_on_its_own(tmp_path):
    network, calls = _network()
    inferer = PromptedInferer(predictor_cache=PredictorCache())
    image = _batch(_write(tmp_path / "a.nii.gz", 0))
    _segment(inferer, network, image, [P1], [P2])
    assert calls.decode == 2

    _, report = _segment(inferer, network, image, [P1, P3], [P1])  # object 1: one new click; object 2: P2 undone
    assert calls.decode == 2 + 1 + 1 and calls.encode == 1
    assert [o["clicks"] for o in report["objects"]] == [2, 1]


def test_a_changed_earlier_mask_starts_the_object_again(tmp_path):
    network, calls = _network()
    inferer = PromptedInferer(predictor_cache=PredictorCache())
    image = _batch(_write(tmp_path / "a.nii.gz", 0))
    prev_mask = torch.zeros(1, 1, *SHAPE, dtype=torch.int16)
    prev_mask[0, 0, 15:25, 15:25, 15:25] = 1
    _segment(inferer, network, image, [P1], prev_mask=prev_mask)
    _segment(inferer, network, image, [P1, P2], prev_mask=prev_mask)
    assert calls.decode == 2  # same earlier mask: only the new click

    prev_mask[0, 0, 15:25, 15:25, 25:30] = 1
    _, report = _segment(inferer, network, image, [P1, P2], prev_mask=prev_mask)
    assert calls.decode == 2 + 2 and calls.encode == 1  # replayed on the new mask, not re-encoded
    assert report["predictor_reused"] is True


def test_a_different_grid_under_the_same_file_is_not_answered_from_the_kept_predictor(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    path = _write(tmp_path / "a.nii.gz", 0)
    _segment(inferer, network, _batch(path), [P1])
    shifted = AFFINE.copy()
    shifted[:3, 3] = 30.0
    _, report = _segment(inferer, network, _batch(path, affine=shifted), [P1, P2])
    assert report["predictor_reused"] is False and calls.encode == 2
    assert report["objects"][0]["prompt_steps"] == 2 and len(cache) == 1
    [predictor] = _kept_predictors(cache)
    assert np.allclose(predictor.grid.stored_affine, shifted)


def test_images_without_a_file_and_duplicate_objects_are_not_kept(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    for _ in range(2):
        _, report = _segment(inferer, network, _batch(None), [P1])
        assert "predictor_reused" not in report
    assert calls.encode == 2 and len(cache) == 0

    image = _batch(_write(tmp_path / "a.nii.gz", 0))
    for _ in range(2):
        inferer(image, network, _prompts([P1], [P2], labels=[1, 1]))
    assert calls.encode == 4 and len(cache) == 0


def test_a_failed_request_drops_the_image_predictor(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    image = _batch(_write(tmp_path / "a.nii.gz", 0))
    _segment(inferer, network, image, [P1])
    with pytest.raises(ValueError, match="outside the image"):
        _segment(inferer, network, image, [P1, P2, ((60, 20, 20), True)])  # P2 applied, then the bad click
    assert len(cache) == 0  # half-applied clicks are not kept

    _, report = _segment(inferer, network, image, [P1, P2])
    assert report["predictor_reused"] is False and calls.encode == 2
    assert report["objects"][0]["clicks"] == 2


def test_clear_forgets_every_image(tmp_path):
    network, calls = _network()
    cache = PredictorCache()
    inferer = PromptedInferer(predictor_cache=cache)
    image = _batch(_write(tmp_path / "a.nii.gz", 0))
    _segment(inferer, network, image, [P1])
    cache.clear()
    assert len(cache) == 0
    _, report = _segment(inferer, network, image, [P1, P2])
    assert report["predictor_reused"] is False and calls.encode == 2


def test_calls_through_one_cache_run_one_at_a_time(tmp_path):
    network, _ = _network()
    cache = PredictorCache(max_images=4)
    inferer = PromptedInferer(predictor_cache=cache)
    images = [_batch(_write(tmp_path / f"{i}.nii.gz", i), i) for i in range(3)]
    running, overlap = 0, []
    guard = threading.Lock()
    encode = network.encode

    def slow_encode(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal running
        with guard:
            running += 1
            overlap.append(running)
        time.sleep(0.05)  # lets another thread in, were the calls not serialised
        with guard:
            running -= 1
        return encode(*args, **kwargs)

    network.encode = slow_encode
    errors: list[BaseException] = []

    def request(image: MetaTensor) -> None:
        try:
            _segment(inferer, network, image, [P1])
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=request, args=(image,)) for image in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(overlap) == 3 and max(overlap) == 1
    assert len(cache) == 3
