"""Datalists and the datasets, loaders and sampler around them: the run's case list (every invalid case reported),
a dataset that survives a bad case, collation that keeps each case's prompts whole, labelled datalists checked
before training, the seeded epoch sampler. A case's form is parsed in :mod:`custom.cases`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, IterableDataset, MetaTensor, list_data_collate
from monai.transforms import apply_transform
from torch.utils.data import Dataset, Sampler

from .cases import CaseError, case_name, entry_image, parse_case, unique_case_names
from .io import as_label_map, load_volume, read_npz_case
from .object_prompts import PROMPTS_META, CasePrompts
from .seeding import seed_value, seeded_generator

logger = logging.getLogger(__name__)


def read_datalist(path: str | os.PathLike, data_list_key: str | None = None) -> tuple[list[Any], Path]:
    """Entries of a datalist JSON: a list of cases, or a dict holding one under ``data_list_key``.

    Returns:
        the raw entries and the folder relative paths refer to (the datalist's own folder).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {str(path)!r} does not exist")
    with open(path) as handle:
        content = json.load(handle)
    if isinstance(content, Mapping):
        keys = [data_list_key] if data_list_key else [k for k in ("testing", "test", "data") if k in content]
        if not keys or keys[0] not in content:
            raise ValueError(
                f"datalist {str(path)!r} has no list under {data_list_key or 'testing/test/data'!r}; "
                f"keys: {sorted(content)}"
            )
        content = content[keys[0]]
    if not isinstance(content, list) or not content:
        raise ValueError(f"datalist {str(path)!r} holds no cases")
    return content, path.parent


class CaseList:
    """The cases of one run with every invalid one reported: a plain container, made by its factories
    (:meth:`prompted` for inference, :meth:`labelled` for evaluation, :meth:`images` for automatic segmentation).

    Invalid cases are logged and kept in :attr:`failures`; the valid ones are in :attr:`cases`.
    :meth:`raise_if_failed` ends the run with a non-zero status when anything failed.
    """

    def __init__(
        self,
        cases: Sequence[dict[str, Any]] = (),
        failures: Sequence[str] = (),
        warnings: Sequence[str] = (),
    ) -> None:
        self.cases: list[dict[str, Any]] = list(cases)
        self.failures: list[str] = list(failures)
        self.warnings: list[str] = list(warnings)

    @classmethod
    def prompted(
        cls,
        input_dict: Mapping[str, Any] | None = None,
        datalist: str | os.PathLike | None = None,
        data_list_key: str | None = None,
        base_dir: str | os.PathLike | None = None,
    ) -> CaseList:
        """Cases to segment with their prompts, from ``input_dict`` and/or a datalist, each parsed
        (:func:`custom.cases.parse_case`); an invalid one is a failure, the others go on.

        Raises:
            ValueError: nothing to segment.
        """
        raw = _given_entries(input_dict, datalist, data_list_key, base_dir)
        entries = [(entry, folder) for entry, folder, _ in raw]
        cases = cls()
        images: list[Path | None] = []
        for entry, folder in entries:
            try:
                images.append(entry_image(entry, folder))
            except CaseError as err:
                images.append(None)
                cases.report_failure(str(err))
        named = [(entry, folder, image) for (entry, folder), image in zip(entries, images) if image is not None]
        given = [entry.get("case") for entry, _, _ in named]
        for (entry, folder, _), case in zip(named, unique_case_names([i for _, _, i in named], given)):
            try:
                cases.cases.append(parse_case(entry, folder, case))
            except CaseError as err:
                cases.report_failure(str(err))
        return cases

    @classmethod
    def labelled(
        cls,
        datalist: str | os.PathLike | Sequence[str | os.PathLike],
        data_list_key: str = "validation",
        dataset_dir: str | os.PathLike | None = None,
        max_grid_voxels: int | None = None,
        spacing_mm: Sequence[float] | float | None = None,
    ) -> CaseList:
        """Labelled cases for evaluation: unusable entries are reported as failures, the rest are kept; an entry
        listed again (same image and label files) is counted once, with a warning (:attr:`warnings`).

        Args:
            max_grid_voxels, spacing_mm: the predictor's limit, checked from each image's header first.
        """
        cases = cls()
        entries, first = [], {}
        for index, entry in enumerate(read_labelled_datalist(datalist, data_list_key, dataset_dir)):
            files = tuple(os.path.realpath(str(entry[k])) if entry.get(k) else None for k in ("image", "label"))
            if files in first:
                cases.report_warning(
                    f"entry {index} of {data_list_key!r} repeats entry {first[files]} (image {entry.get('image')!r}, "
                    f"label {entry.get('label')!r}): evaluated and counted once"
                )
                continue
            first[files] = index
            entries.append(entry)
        cases.cases, problems = check_labelled_entries(entries, max_grid_voxels=max_grid_voxels, spacing_mm=spacing_mm)
        for problem in problems:
            cases.report_failure(problem)
        return cases

    @classmethod
    def images(
        cls,
        input_dict: Mapping[str, Any] | None = None,
        datalist: str | os.PathLike | None = None,
        data_list_key: str | None = None,
        require_label: bool = False,
        max_cases: int | None = None,
    ) -> CaseList:
        """Cases to segment automatically, from ``input_dict`` and/or a datalist (a list, or a dict holding one
        under ``data_list_key``): ``{"image", "case", "modality"}`` (the entry's modality, else an MSD
        ``dataset.json``'s ``modality["0"]``) plus ``"label"`` where the entry has one;
        prompts, if any, are ignored. A missing file is reported as a failure of the run
        (:meth:`raise_if_failed`) and the other cases go on.

        Args:
            require_label: evaluation: an entry without an existing ``label`` file is a failure.
            max_cases: keep the first ``max_cases`` entries only (in datalist order); None: all.

        Raises:
            ValueError: nothing to segment (no input, an empty datalist, ``max_cases < 1``).
        """
        if max_cases is not None and max_cases < 1:
            raise ValueError(f"max_cases must be >= 1 or None, got {max_cases!r}")
        listed_modality = dataset_modality(datalist) if datalist else ""
        entries = [
            (entry, folder, listed_modality if listed else "")
            for entry, folder, listed in _given_entries(input_dict, datalist, data_list_key)
        ][:max_cases]
        cases = cls()
        valid = []
        for entry, folder, default_modality in entries:
            if not isinstance(entry, Mapping) or "image" not in entry:
                cases.report_failure(f"a case must be a dict with an 'image' path, got {entry!r}")
                continue
            paths = {}
            for key in ("image", "label"):
                if key in entry:
                    path = Path(str(entry[key])).expanduser()
                    paths[key] = Path(os.path.abspath(folder / path if folder is not None else path))
            valid.append((entry, default_modality, paths))
        names = unique_case_names([p["image"] for _, _, p in valid], [e.get("case") for e, _, _ in valid])
        for (entry, default_modality, paths), case in zip(valid, names):
            problems = [f"{k} {str(p)!r} does not exist" for k, p in paths.items() if not p.exists()]
            if require_label and "label" not in paths:
                problems.append("no 'label' entry (evaluation needs the reference segmentation)")
            if problems:
                cases.report_failure(f"case {case!r}: " + "; ".join(problems))
                continue
            item = {k: str(p) for k, p in paths.items()}
            if entry.get("series_uid"):
                item["series_uid"] = str(entry["series_uid"])
            cases.cases.append(dict(item, case=case, modality=str(entry.get("modality", default_modality))))
        return cases

    def report_failure(self, message: str) -> None:
        logger.error(message)
        self.failures.append(message)

    def report_warning(self, message: str) -> None:
        """Something the run handled (and says so) without failing a case; listed in evaluation summaries."""
        logger.warning(message)
        self.warnings.append(message)

    def raise_if_failed(self) -> None:
        """Raise (non-zero exit of ``monai.bundle run``) when any case failed."""
        if self.failures:
            raise RuntimeError(f"{len(self.failures)} case(s) failed:\n  " + "\n  ".join(self.failures))


def _given_entries(
    input_dict: Mapping[str, Any] | None,
    datalist: str | os.PathLike | None,
    data_list_key: str | None,
    base_dir: str | os.PathLike | None = None,
) -> list[tuple[Any, Path | None, bool]]:
    """A run's raw entries, ``input_dict`` first and then the datalist's, each with the folder its relative paths
    start from (``base_dir`` if given, else the datalist's own) and whether it came from the datalist.

    Raises:
        ValueError: neither gives an entry.
    """
    base = Path(base_dir) if base_dir else None
    entries: list[tuple[Any, Path | None, bool]] = [(input_dict, base, False)] if input_dict else []
    if datalist:
        raw, folder = read_datalist(datalist, data_list_key)
        entries.extend((entry, base or folder, True) for entry in raw)
    if not entries:
        raise ValueError("nothing to segment: give --input_dict or --datalist")
    return entries


#: the key of the item :class:`FaultTolerantDataset` yields for a case that failed
FAILURE_KEY = "__case_failure__"


class FaultTolerantDataset(IterableDataset):
    """Applies ``transform`` to each case; a case whose transform fails becomes a failure item (the case and
    the root cause) that :class:`CaseLoader` reports and drops. With ``num_workers > 0`` each worker takes
    its share of the cases.

    Args:
        cases: the :class:`CaseList` whose valid cases are read (and, through the loader, whose failures grow).
        transform: the pre-processing.
    """

    def __init__(self, cases: CaseList, transform: Callable | None = None) -> None:
        super().__init__(data=cases.cases, transform=transform)
        self.case_list = cases

    def __iter__(self) -> Iterator[Any]:
        worker = torch.utils.data.get_worker_info()
        share = self.case_list.cases if worker is None else self.case_list.cases[worker.id :: worker.num_workers]
        for item in share:
            try:
                yield apply_transform(self.transform, item) if self.transform is not None else item
            except Exception as err:  # one bad case must not stop the others
                cause = err
                while cause.__cause__ is not None:  # MONAI wraps transform errors; report the root cause
                    cause = cause.__cause__
                yield {FAILURE_KEY: f"case {item['case']!r}: {type(cause).__name__}: {cause}", "case": item["case"]}


def collate_cases(items: Sequence[Mapping[str, Any]]) -> Any:
    """MONAI's ``list_data_collate``, with each case's prompts (``objects``, a
    :class:`~custom.object_prompts.CasePrompts`) kept whole: a list with one per item, which MONAI's de-collation
    hands back item by item. The copy :class:`~custom.transforms.ClicksToVoxelsd` left in the image's metadata
    (for inferers called without them) is dropped: the batch carries them."""
    prompts, rest = [], []
    for item in items:
        item = dict(item)
        found = item.pop("objects") if isinstance(item.get("objects"), CasePrompts) else None
        for value in item.values():
            if isinstance(value, MetaTensor):
                value.meta.pop(PROMPTS_META, None)
        prompts.append(found)
        rest.append(item)
    batch = list_data_collate(rest)
    if any(p is not None for p in prompts):
        batch["objects"] = prompts
    return batch


class CaseLoader(DataLoader):
    """A MONAI ``DataLoader`` of one case per batch over a :class:`FaultTolerantDataset`: the failure items (made
    in the worker processes too) are reported to the dataset's case list, in this process, and left out.

    Args:
        dataset: the :class:`FaultTolerantDataset`.
        num_workers: worker processes (each reads its share of the cases).
        kwargs: other ``DataLoader`` arguments (``pin_memory``...); the batch size is 1.
    """

    def __init__(self, dataset: FaultTolerantDataset, num_workers: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("collate_fn", collate_cases)
        super().__init__(dataset, batch_size=1, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if FAILURE_KEY in batch:
                self.dataset.case_list.report_failure(batch[FAILURE_KEY][0])
                continue
            yield batch


def dataset_modality(path: str | os.PathLike) -> str:
    """The modality an MSD ``dataset.json`` names once for all its cases (``modality["0"]``, e.g. ``"CT"``,
    which chooses the intensity clamping); ``""`` when the file names none."""
    with open(path) as handle:
        content = json.load(handle)
    listed = content.get("modality", {}) if isinstance(content, Mapping) else {}
    return str(listed.get("0", "")) if isinstance(listed, Mapping) else str(listed)


def dataset_labels(datalist: str | os.PathLike | Sequence[Any]) -> dict[str, str]:
    """Label value (as a string) -> name, from the first MSD ``dataset.json``'s ``labels``; ``{}`` when the
    datalist names none (a plain list of entries)."""
    first = datalist if isinstance(datalist, (str, os.PathLike)) else (datalist[0] if datalist else None)
    if not isinstance(first, (str, os.PathLike)) or not Path(first).is_file():
        return {}
    with open(first) as handle:
        content = json.load(handle)
    labels = content.get("labels", {}) if isinstance(content, Mapping) else {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def read_labelled_datalist(
    datalist: str | os.PathLike | Sequence[str | os.PathLike],
    data_list_key: str = "training",
    dataset_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Entries of one or several MSD-style ``dataset.json`` files, paths made absolute; each entry gains
    ``modality`` (the dataset's ``modality["0"]``, e.g. ``"CT"``, which chooses the intensity clamping).

    Args:
        datalist: one file or a list of files; a file may also hold a plain list of ``{"image", "label"}``
            entries, and ``datalist`` may be such a list itself (as MONAI Label and MONAI FL pass data).
        data_list_key: the list to read in each file.
        dataset_dir: the folder relative paths start from (one datalist only); default: the file's folder.
    """
    from monai.data import load_decathlon_datalist

    if isinstance(datalist, Sequence) and not isinstance(datalist, str) and datalist:
        if all(isinstance(entry, Mapping) for entry in datalist):
            base = Path(dataset_dir) if dataset_dir else Path.cwd()
            return [_absolute_entry(entry, base) for entry in datalist]
    paths = [Path(datalist)] if isinstance(datalist, (str, os.PathLike)) else [Path(p) for p in datalist]
    entries = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"datalist {str(path)!r} does not exist")
        base = Path(dataset_dir) if dataset_dir and len(paths) == 1 else path.parent
        with open(path) as handle:
            content = json.load(handle)
        if isinstance(content, list):
            if not content:
                raise ValueError(f"datalist {str(path)!r} is empty")
            entries.extend(_absolute_entry(entry, base) for entry in content)
            continue
        try:
            listed = load_decathlon_datalist(
                str(path), is_segmentation=True, data_list_key=data_list_key, base_dir=str(base)
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"datalist {str(path)!r}: no list {data_list_key!r} ({err})") from err
        if not listed:
            raise ValueError(f"datalist {str(path)!r}: the list {data_list_key!r} is empty")
        modality = dataset_modality(path)
        entries.extend(dict(entry, modality=modality) for entry in listed)
    return entries


def _absolute_entry(entry: Any, base: Path) -> dict[str, Any]:
    """A plain ``{"image", "label"}`` entry with its paths made absolute against ``base``."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"a datalist entry must be a dict with 'image' and 'label', got {entry!r}")
    absolute = dict(entry)
    for key in ("image", "label"):
        if key in absolute and not Path(str(absolute[key])).is_absolute():
            absolute[key] = str(base / str(absolute[key]))
    absolute.setdefault("modality", "")
    return absolute


def check_labelled_entries(
    entries: Sequence[Mapping[str, Any]],
    min_target_voxels: int = 1,
    max_grid_voxels: int | None = None,
    spacing_mm: Sequence[float] | float | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Split entries into usable ones and problems: every image and label must exist and be readable (each header
    checked first, :func:`custom.io.load_volume`), have the same spatial shape and hold a class of at least
    ``min_target_voxels`` voxels, with whole-number label values. Usable entries gain ``classes`` (the labels
    present) and ``case``.

    Args:
        max_grid_voxels, spacing_mm: the predictor's grid limit and spacing (None: memory is the only limit).
    """

    problems, checked = [], []
    names = unique_case_names([e.get("image", "?") for e in entries], [e.get("case") for e in entries])
    for entry, case in zip(entries, names):
        needed = ("image",) if str(entry.get("image", "")).lower().endswith(".npz") else ("image", "label")
        missing = [k for k in needed if k not in entry or not Path(entry[k]).exists()]
        if missing:
            problems.append(f"{case}: {', '.join(f'{k} {entry.get(k)!r}' for k in missing)} does not exist")
            continue
        limits = {"max_grid_voxels": max_grid_voxels, "spacing_mm": spacing_mm}
        try:
            if str(entry["image"]).lower().endswith(".npz"):
                loaded = read_npz_case(entry["image"], **limits)
                image_shape, label = tuple(loaded["image"].shape), loaded.get("label")
                if label is None:
                    raise ValueError("the case holds no 'gts'")
            else:
                image_shape = tuple(load_volume(entry["image"], entry.get("series_uid"), **limits).shape)
                label = as_label_map(load_volume(entry["label"], dtype=None), str(entry["label"]))
        except CaseError as err:  # named already
            problems.append(f"{case}: {err}")
            continue
        except Exception as err:  # report unreadable files with the others
            problems.append(f"{case}: unreadable ({type(err).__name__}: {err})")
            continue
        if tuple(label.shape) != image_shape:  # channel first, both
            shapes = f"label shape {tuple(label.shape)[1:]} does not match image shape {image_shape[1:]}"
            problems.append(f"{case}: {shapes}")
            continue
        values, counts = np.unique(np.asarray(label), return_counts=True)
        classes = [int(v) for v, c in zip(values, counts) if v > 0 and c >= min_target_voxels]
        if not classes:
            problems.append(f"{case}: the label has no foreground voxel")
            continue
        checked.append(dict(entry, classes=classes, case=case))
    return checked, problems


def load_training_datalist(
    datalist: str | os.PathLike | Sequence[str | os.PathLike],
    data_list_key: str = "training",
    dataset_dir: str | os.PathLike | None = None,
    min_target_voxels: int = 1,
) -> list[dict[str, Any]]:
    """:func:`read_labelled_datalist` then :func:`check_labelled_entries`, before training starts.

    Raises:
        ValueError: listing every faulty entry (and the datalist), or when a list is empty.
    """
    entries = read_labelled_datalist(datalist, data_list_key, dataset_dir)
    checked, problems = check_labelled_entries(entries, min_target_voxels)
    if problems:
        names = datalist if isinstance(datalist, (str, os.PathLike)) else ", ".join(map(str, datalist))
        raise ValueError(
            f"datalist {str(names)!r} ({data_list_key!r}): {len(problems)} of {len(entries)} entries are "
            "unusable:\n  " + "\n  ".join(problems)
        )
    return checked


def _has_list(path: Path, key: str) -> bool:
    """Whether the datalist file ``path`` is a dict holding ``key`` (a plain list never does)."""
    with open(path) as handle:
        content = json.load(handle)
    return isinstance(content, Mapping) and key in content


def hold_out(
    entries: Sequence[Mapping[str, Any]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``entries`` into (training, validation): ``round(val_fraction * n)`` cases (at least 1, at most
    ``n - 1``) drawn with ``seed``, both lists in the datalist's order. With one case, or ``val_fraction`` 0,
    nothing is held out: validation runs on the training cases (the caller says so)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(entries)
    if n < 2 or val_fraction == 0:
        return [dict(e) for e in entries], [dict(e) for e in entries]
    count = min(max(1, round(val_fraction * n)), n - 1)
    held = set(np.random.default_rng(seed).permutation(n)[:count].tolist())
    kept = [dict(e) for i, e in enumerate(entries) if i not in held]
    return kept, [dict(e) for i, e in enumerate(entries) if i in held]


def split_training_datalist(
    datalist: str | os.PathLike | Sequence[Any],
    data_list_key: str = "training",
    val_data_list_key: str = "validation",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation entries, checked (:func:`load_training_datalist`).

    A datalist file with a ``val_data_list_key`` list gives both lists as they are. One without (a plain
    ``[{"image", "label"}]`` list, as MONAI Label passes data, or an MSD ``dataset.json`` with a training list
    only) gives a held-out share of its training entries for validation (:func:`hold_out`, seeded), and says so
    in the log; with a single case it warns that validation runs on the training case. Several files are split
    each on its own.
    """
    if isinstance(datalist, Sequence) and not isinstance(datalist, str) and datalist:
        sources = [datalist] if all(isinstance(e, Mapping) for e in datalist) else [Path(p) for p in datalist]
    else:
        sources = [Path(datalist)]
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    for source in sources:
        if isinstance(source, Path) and source.is_file() and _has_list(source, val_data_list_key):
            train += load_training_datalist(source, data_list_key)
            val += load_training_datalist(source, val_data_list_key)
            continue
        entries = load_training_datalist(source, data_list_key)
        name = str(source) if isinstance(source, Path) else "the given entries"
        kept, held = hold_out(entries, val_fraction, seed)
        if len(held) == len(entries):
            logger.warning(
                f"datalist {name!r} has no {val_data_list_key!r} list and {len(entries)} case(s) "
                f"(val_fraction {val_fraction}): validation runs on the training cases, its scores are not held out"
            )
        else:
            logger.warning(
                f"datalist {name!r} has no {val_data_list_key!r} list: holding out {len(held)} of {len(entries)} "
                f"cases for validation (val_fraction {val_fraction}, seed {seed}): "
                + ", ".join(case_name(e["image"]) for e in held)
            )
        train += kept
        val += held
    return train, val


def expand_targets(entries: Sequence[Mapping[str, Any]], max_targets: int | None = None) -> list[dict[str, Any]]:
    """One entry per (case, class present): the validation targets; at most ``max_targets``, evenly spaced."""
    targets = [dict(entry, target_class=c) for entry in entries for c in entry["classes"]]
    if max_targets is not None and len(targets) > max_targets:
        targets = [targets[round(i * len(targets) / max_targets)] for i in range(max_targets)]
    return targets


class EpochSampler(Sampler):
    """The order of one epoch as a function of ``(seed, epoch)``, optionally one rank's share of it, with each
    sample's own random seed: yields ``(sample_seed, index)`` pairs for :class:`SeededDataset`.

    Nothing depends on what ran before, so a run resumed at any iteration draws what the uninterrupted run drew:
    :meth:`attach` it to the trainer, and at each epoch start it takes the epoch and skips the samples the
    trainer has already done (a resumed mid-epoch start).

    Args:
        dataset: the dataset (its length).
        batch_size: samples per iteration (to turn iterations into samples).
        shuffle: a new permutation each epoch.
        seed: the run's seed.
        num_replicas, rank: the share of one of ``num_replicas`` processes (DDP); the order is padded to a
            multiple of ``num_replicas`` by repeating its start, so every rank has as many samples.

    Hand-written rather than Ignite's deterministic engine (``ReproducibleBatchSampler``): each sample gets its own
    seed, so the random transforms in the loader's workers draw alike whatever the number of workers or ranks.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must lie in [0, num_replicas={num_replicas})")
        self.size, self.batch_size, self.shuffle, self.seed = len(dataset), int(batch_size), shuffle, int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch, self.start = 1, 0

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)

    def epoch_started(self, engine: Any) -> None:
        self.epoch = engine.state.epoch
        done = engine.state.iteration - (engine.state.epoch - 1) * engine.state.epoch_length
        self.start = max(done, 0) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = seeded_generator(self.seed, self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        total = len(self) * self.num_replicas
        order = torch.cat([order, order[: total - self.size]]) if total > self.size else order
        share = order[self.rank :: self.num_replicas].tolist()
        for position in range(self.start, len(share)):
            key = seed_value(self.seed, self.epoch, position * self.num_replicas + self.rank)
            yield key % (2**31), share[position]


class SamplerEpochHandler:
    """Trainer handler that keeps an :class:`EpochSampler` at the trainer's epoch and position (a handler entry
    of its own, so that the config's handler list holds components only)."""

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler

    def attach(self, engine: Any) -> None:
        self.sampler.attach(engine)


class SeededDataset(Dataset):
    """A dataset in two parts: ``cache_transform`` (the deterministic part: load, orient, clamp) applied once and
    kept in memory by a ``CacheDataset``, then ``transform`` (the random part: target, crop, resampling, flips)
    for every sample, with its random state set from the sample's seed (:class:`EpochSampler`): a sample's
    draws depend on the seed, the epoch and its position, not on earlier samples or on the worker.

    Args:
        data: the entries (``image``, ``label``...).
        cache_transform: the deterministic part.
        transform: the random part.
        cache_num_workers: threads that fill the cache.
    """

    def __init__(self, data: Sequence[Any], cache_transform: Callable, transform: Callable, cache_num_workers: int = 0):
        from monai.data import CacheDataset

        self.cache = CacheDataset(data, cache_transform, cache_rate=1.0, num_workers=cache_num_workers, progress=False)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: Any) -> Any:
        seed, index = key if isinstance(key, tuple) else (None, key)
        if seed is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(seed))
        return apply_transform(self.transform, self.cache[index])


class TargetDataset(Dataset):
    """Validation targets without copies of their volumes: each case is cached once (``cache_transform``) and
    every (case, class present) pair is an item, ``transform`` applied with ``target_class`` set.

    Args:
        data: the cases; ``cache_transform`` must give each a ``classes`` list (:class:`ListClassesd`).
        cache_transform, transform: as in :class:`SeededDataset` (``transform`` deterministic here).
        max_targets: at most this many targets, evenly spaced over the list (None: all).
    """

    def __init__(
        self,
        data: Sequence[Any],
        cache_transform: Callable,
        transform: Callable,
        max_targets: int | None = None,
        cache_num_workers: int = 0,
    ) -> None:
        from monai.data import CacheDataset

        self.cache = CacheDataset(data, cache_transform, cache_rate=1.0, num_workers=cache_num_workers, progress=False)
        self.transform = transform
        targets = [(i, int(c)) for i in range(len(self.cache)) for c in self.cache[i]["classes"]]
        if max_targets is not None and len(targets) > max_targets:
            targets = [targets[round(i * len(targets) / max_targets)] for i in range(max_targets)]
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        case, target_class = self.targets[index]
        return apply_transform(self.transform, dict(self.cache[case], target_class=target_class))
