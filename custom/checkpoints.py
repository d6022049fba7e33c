"""A training run's files and state: the run folder's check, the latest checkpoint and the resume state (the
global random generators included, as tensors for ``weights_only=True``), the best model with its metric, and a
TensorBoard writer created at its first use. Handlers for the training configs' Ignite engines."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.handlers import CheckpointLoader
from torch import nn

from .files import check_writable_folder, write_text_atomic
from .networks.checkpoint import checkpoint_payload, save_atomic
from .networks.common import as_flag

logger = logging.getLogger(__name__)


def check_run_folder(output_dir: str | os.PathLike, resume: bool) -> Path:
    """A training run's folder: usable and writable (:func:`custom.files.check_writable_folder`); one that holds
    an earlier run is refused unless ``resume`` (``model.pt`` must be the best of *this* run).

    Raises:
        FileExistsError: naming the folder and what it holds.
    """
    resume = as_flag(resume, "resume")
    folder = check_writable_folder(output_dir)
    earlier = [name for name in ("training_state.pt", "model.pt", "model.json") if (folder / name).exists()]
    if earlier and not resume:
        raise FileExistsError(
            f"output_dir {str(folder)!r} holds an earlier run ({', '.join(earlier)}): pass --resume True to "
            "continue it, or give another --output_dir (or remove those files) to start a new one"
        )
    if resume and not (folder / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume: {str(folder / 'training_state.pt')!r} does not exist")
    return folder


def random_states() -> dict:
    """The global random generators' states (torch, CUDA, numpy, Python) as tensors and numbers, so that the
    file loads with ``weights_only=True``; for an exact resume."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.as_tensor(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": python_gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict) -> None:
    """Inverse of :func:`random_states`."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class LazySummaryWriter:
    """A TensorBoard ``SummaryWriter`` for ``log_dir`` created at its first use: a workflow's ``initialize`` and
    property checks then leave no folder or empty event file behind (MONAI's ``TensorBoardStatsHandler`` would
    create its writer when the config is parsed). One instance shared by the trainer's and the evaluator's handlers
    gives the run one event file."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = str(log_dir)
        self._writer = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        attribute = getattr(self._writer, name)
        if not name.startswith("add_"):
            return attribute

        def add_and_flush(*args, **kwargs):  # the handlers never close a writer they were given
            attribute(*args, **kwargs)
            self._writer.flush()

        return add_and_flush

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class SaveLatestCheckpoint:
    """Trainer handler: after every epoch (and every ``every_n_iterations`` iterations, if > 0),
    ``<output_dir>/model_latest.pt`` (``checkpoint_payload``) and ``<output_dir>/training_state.pt`` (network,
    optimizer, scheduler, trainer, scaler and the global random generators: what ``--resume`` loads), each
    written atomically and flushed to disk.

    The data order and every random draw of the training (target, crop, flips, clicks) are functions of the
    seed, the epoch and the position in the epoch (:class:`custom.data.EpochSampler`,
    :class:`custom.engines.InteractiveTrainingStep`), so this state is enough to continue exactly where it stopped.

    Args:
        output_dir: the run's folder.
        network: the promptable network (not a wrapper).
        state_objects: name -> object with ``state_dict()`` for the resumable state; the trainer it is
            attached to is added as ``trainer``.
        every_n_iterations: also save every this many iterations (0: at epoch ends only).

    When the run ends without a ``model.pt`` (no validation ran: fewer epochs than ``val_interval``), the final
    weights become ``model.pt``, with ``model.json`` saying that no metric chose them; a later validation of a
    resumed run replaces them (:class:`SaveBestModel`).

    Hand-written rather than MONAI's ``CheckpointSaver``: the resume file also holds the global random generators'
    states (as tensors, for ``weights_only=True``), and a run without validation still ends with a ``model.pt``.
    """

    def __init__(self, output_dir: str, network: nn.Module, state_objects: dict, every_n_iterations: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.network = network
        self.state_objects = state_objects
        self.every_n_iterations = int(every_n_iterations)

    def attach(self, engine) -> None:
        self.state_objects = dict(self.state_objects, trainer=engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.every_n_iterations > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), self)
        engine.add_event_handler(Events.COMPLETED, self.final_weights)

    def final_weights(self, engine) -> None:
        """``model.pt`` from the final weights, where no validation wrote one."""
        if (self.output_dir / "model.pt").exists():
            return
        save_atomic(checkpoint_payload(self.network), self.output_dir / "model.pt")
        summary = {
            "epoch": engine.state.epoch,
            "key_metric": None,
            "best_metric": None,
            "metrics": {},
            "note": "the final weights: no validation ran (fewer epochs than val_interval)",
        }
        write_text_atomic(self.output_dir / "model.json", json.dumps(summary, indent=2))
        logger.warning(
            f"no validation ran in {engine.state.epoch} epoch(s) (val_interval is larger): "
            f"{self.output_dir / 'model.pt'} holds the final weights"
        )

    def __call__(self, engine) -> None:
        save_atomic(checkpoint_payload(self.network), self.output_dir / "model_latest.pt")
        state = {name: obj.state_dict() for name, obj in self.state_objects.items() if obj is not None}
        state["random_states"] = random_states()
        save_atomic(state, self.output_dir / "training_state.pt")


def read_training_state(path: str | os.PathLike) -> dict:
    """``training_state.pt`` as :class:`SaveLatestCheckpoint` wrote it (tensors and numbers: ``weights_only``).

    Raises:
        ValueError: naming the file, what is wrong with it and the safe next step (never ``weights_only=False``).
    """
    path = Path(path)
    restart = (
        f"resume cannot continue from it: start a new run in another --output_dir, with --pretrained_ckpt "
        f"{str(path.parent / 'model_latest.pt')!r} to keep the last saved weights if that file loads"
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{str(path)!r} holds pickled Python objects, which are not loaded (unpickling them could run code; do "
            f"not load it with weights_only=False): this bundle writes tensors and numbers only, so the file comes "
            f"from elsewhere or was altered; {restart}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        size = f"{path.stat().st_size:,} bytes" if path.is_file() else "missing"
        raise ValueError(
            f"{str(path)!r} ({size}) is damaged (truncated, or not a PyTorch file: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); {restart}"
        ) from None


class ResumeTrainingState(CheckpointLoader):
    """``CheckpointLoader`` for ``training_state.pt`` that also restores the trainer it is attached to
    (epoch, iteration), which a config cannot name inside the trainer's own handler list, and the global
    random generators; a damaged or foreign file is named with the safe next step (:func:`read_training_state`)."""

    def attach(self, engine) -> None:
        self.load_dict = dict(self.load_dict, trainer=engine)
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self._restore_random_states)

    def __call__(self, engine) -> None:
        read_training_state(self.load_path)  # MONAI's own load would say only torch's words, without the file
        super().__call__(engine)

    def _restore_random_states(self, engine) -> None:
        checkpoint = read_training_state(self.load_path)
        if "random_states" in checkpoint:
            restore_random_states(checkpoint["random_states"])


class SaveBestModel:
    """Evaluator handler: ``<output_dir>/model.pt`` (``checkpoint_payload``) whenever the key metric
    improves, with the metric in ``model.json`` beside it. (``CheckpointSaver(save_key_metric=True)`` writes its
    own file names and no metric beside the weights; the bundle, MONAI Label's train task and the model card read
    these two files.)"""

    def __init__(self, output_dir: str, network: nn.Module) -> None:
        self.output_dir = Path(output_dir)
        self.network = network

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch:
            return
        previous = self.output_dir / "model.json"
        best = json.loads(previous.read_text()).get("best_metric") if previous.is_file() else None
        if best is not None and best >= engine.state.best_metric:
            return  # a resumed run's evaluator forgets earlier bests: the file remembers them
        save_atomic(checkpoint_payload(self.network), self.output_dir / "model.pt")
        summary = {
            "epoch": engine.state.epoch,
            "key_metric": engine.state.key_metric_name,
            "best_metric": float(engine.state.best_metric),
            "metrics": {k: float(v) for k, v in engine.state.metrics.items()},
        }
        write_text_atomic(self.output_dir / "model.json", json.dumps(summary, indent=2))
