"""Training, evaluation and checkpoint loading for the MNIST and CIFAR-10 models.

Checkpoints are plain ``state_dict`` files written with :func:`torch.save`, so they
load with ``torch.load(..., weights_only=True)`` (no pickled code). Next to each
checkpoint ``<name>.pt`` sits ``<name>.json`` with the model name, test accuracy,
hyper-parameters, data checksum and timing. While training runs, the optimiser and
RNG state needed to resume is kept in ``<name>.resume.pt`` and deleted once the last
epoch is done.

This module never calls :func:`torch.set_num_threads`; callers decide the thread
count.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, TensorDataset

from ._core.io import atomic_write, model_device
from ._core.progress import progress_bar
from .data import (
    DATA_ENV_VAR,
    load_cifar10,
    load_mnist,
    locate_mnist,
    mnist_checksum,
    resolve_data_root,
)
from .models import build_model

__all__ = [
    "cifar10_eval_transform",
    "cifar10_train_transform",
    "evaluate_accuracy",
    "load_model",
    "load_named_or",
    "metadata_path",
    "read_metadata",
    "train_cifar10",
    "train_mnist",
]

Transform = Callable[[torch.Tensor], torch.Tensor]
TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

_CIFAR_CROP = 24
_CIFAR_SIZE = 32


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def metadata_path(checkpoint_path: str | os.PathLike[str]) -> Path:
    """Return the metadata JSON path belonging to a checkpoint (``x.pt`` -> ``x.json``).

    Args:
        checkpoint_path: Path of the ``.pt`` checkpoint.

    Returns:
        The sibling ``.json`` path.
    """
    return Path(checkpoint_path).with_suffix(".json")


def read_metadata(checkpoint_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata JSON of a checkpoint, or ``{}`` when it has none."""
    meta = metadata_path(checkpoint_path)
    return dict(json.loads(meta.read_text())) if meta.is_file() else {}


def _resume_path(checkpoint_path: Path) -> Path:
    return checkpoint_path.with_name(checkpoint_path.stem + ".resume.pt")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # Atomic so that a crash mid-write leaves the previous checkpoint intact.
    atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_write_json(obj: dict[str, Any], path: Path) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # Detached CPU copies so the file loads anywhere with map_location="cpu".
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_model(checkpoint_path: str | os.PathLike[str], name: str | None = None) -> nn.Module:
    """Load a trained model from a ``state_dict`` checkpoint.

    Args:
        checkpoint_path: Path of the ``.pt`` file.
        name: Model name for :func:`coreunits.models.build_model`. When None it is
            read from the metadata JSON next to the checkpoint.

    Returns:
        The model on the CPU, in eval mode.

    Raises:
        FileNotFoundError: If the checkpoint (or, without ``name``, its metadata) is
            missing.
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if name is None:
        meta = metadata_path(path)
        if not meta.is_file():
            raise FileNotFoundError(
                f"{meta} not found, so the model type of {path} is unknown; pass name="
                f"'mnist' or 'cifar10'"
            )
        name = str(json.loads(meta.read_text())["model"])
    model = build_model(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_named_or(checkpoint_path: str | os.PathLike[str], default: str) -> nn.Module:
    """The model a checkpoint's metadata names (e.g. ``"mnist_mlp"``), else ``default`` (a paper net)."""
    return load_model(checkpoint_path, None if read_metadata(checkpoint_path).get("model") else default)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(
    dataset: Dataset[Any], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Slicing the tensors of a TensorDataset is far faster than per-item collation.
    if isinstance(dataset, TensorDataset):
        x_all, y_all = dataset.tensors[0], dataset.tensors[1]
        for start in range(0, len(x_all), batch_size):
            yield x_all[start : start + batch_size], y_all[start : start + batch_size]
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset[Any],
    batch_size: int = 1000,
    transform: Transform | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Return the fraction of correctly classified samples.

    The model is evaluated in eval mode (no dropout) and its previous train/eval
    mode is restored afterwards.

    Args:
        model: Classifier returning logits.
        dataset: Dataset of ``(input, label)`` pairs.
        batch_size: Evaluation batch size.
        transform: Applied to each input batch on the device before the model, e.g.
            :func:`cifar10_eval_transform` for uint8 CIFAR-10 images.
        device: Where to run; default: the device of the model's parameters.

    Returns:
        Accuracy in [0, 1].
    """
    dev = model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    try:
        with torch.no_grad():
            for x, y in _batches(dataset, batch_size):
                x, y = x.to(dev), y.to(dev)
                if transform is not None:
                    x = transform(x)
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate accuracy on an empty dataset")
    return correct / total


# ---------------------------------------------------------------------------
# CIFAR-10 transforms
# ---------------------------------------------------------------------------


def cifar10_eval_transform(x: torch.Tensor) -> torch.Tensor:
    """Central 24x24 crop of uint8 CIFAR-10 images, as float in [0, 1].

    Args:
        x: uint8 images (N, 3, 32, 32).

    Returns:
        float32 images (N, 3, 24, 24).
    """
    off = (_CIFAR_SIZE - _CIFAR_CROP) // 2
    return x[:, :, off : off + _CIFAR_CROP, off : off + _CIFAR_CROP].float() / 255.0


def cifar10_train_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random augmentation of the TF CIFAR-10 tutorial, vectorised over a batch.

    Random 24x24 crop, random horizontal flip, brightness shift in +-63/255 and
    contrast factor in [0.2, 1.8] (around each channel's mean), then clipping to
    [0, 1]. The clipping is a deliberate difference from TF: without it the
    brightness shift would be undone entirely by the model's per-image
    standardisation.

    Args:
        x: uint8 images (N, 3, 32, 32), on any device.
        generator: CPU generator that drives all random choices, so the augmentation
            is reproducible independently of the device.

    Returns:
        float32 images (N, 3, 24, 24) in [0, 1].
    """
    n, dev = x.shape[0], x.device
    span = _CIFAR_SIZE - _CIFAR_CROP + 1
    oy = torch.randint(0, span, (n,), generator=generator).to(dev)
    ox = torch.randint(0, span, (n,), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    brightness = ((torch.rand(n, generator=generator) * 2 - 1) * (63.0 / 255.0)).to(dev)
    contrast = (0.2 + 1.6 * torch.rand(n, generator=generator)).to(dev)

    ar = torch.arange(_CIFAR_CROP, device=dev)
    rows = oy[:, None] + ar
    cols = ox[:, None] + ar
    # A horizontal flip of the crop is the crop read with reversed column indices.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: (N, 24, 24, C).
    crops = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    out = crops.float() / 255.0 + brightness[:, None, None, None]
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast[:, None, None, None] + mean
    return out.clamp_(0.0, 1.0).contiguous()


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------


def _restore(resume_file: Path, config: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, rngs: tuple[torch.Generator, torch.Generator],
             device: torch.device) -> tuple[list[dict[str, Any]], int, float]:
    """Load a resume state into the model, optimiser and generators: (history, next epoch, seconds so far)."""
    state = torch.load(resume_file, map_location="cpu", weights_only=True)
    if state["config"] != config:
        raise ValueError(
            f"{resume_file} was written with a different configuration "
            f"({state['config']} vs {config}); delete it or pass resume=False"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rngs[0].set_state(state["shuffle_rng"])
    rngs[1].set_state(state["aug_rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return list(state["history"]), int(state["epoch"]), float(state["train_seconds"])


def _train_epoch(model: nn.Module, loader: DataLoader[Any], optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                 train_transform: TrainTransform | None, aug_gen: torch.Generator, bar_desc: str,
                 progress: bool) -> float:
    """One pass over the training data; returns the mean training loss."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = 0.0
    seen = 0
    with progress_bar(loader, enabled=progress, desc=bar_desc, unit="batch") as bar:
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if train_transform is not None:
                x = train_transform(x, aug_gen)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
    return loss_sum / max(seen, 1)


def _resume_state(config: dict[str, Any], epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                  rngs: tuple[torch.Generator, torch.Generator], history: list[dict[str, Any]],
                  train_seconds: float, device: torch.device) -> dict[str, Any]:
    """Everything an interrupted run needs to continue exactly where it stopped."""
    state = {
        "config": config,
        "epoch": epoch,
        "model": _cpu_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "shuffle_rng": rngs[0].get_state(),
        "aug_rng": rngs[1].get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "train_seconds": train_seconds,
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _fit(
    *,
    model_name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    train_ds: TensorDataset,
    test_ds: TensorDataset,
    epochs: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    out_path: Path,
    config: dict[str, Any],
    meta_extra: dict[str, Any],
    train_transform: TrainTransform | None,
    eval_transform: Transform | None,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    """Shared epoch loop: train, evaluate, checkpoint + metadata + resume state."""
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    rngs = (shuffle_gen, aug_gen)
    # batch_size=None + a BatchSampler hands TensorDataset a list of indices per
    # batch: one fancy-index per batch instead of collating single samples.
    sampler = BatchSampler(RandomSampler(train_ds, generator=shuffle_gen), batch_size, False)
    loader = DataLoader(train_ds, batch_size=None, sampler=sampler)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    elapsed_before = 0.0
    resume_file = _resume_path(out_path)
    if resume and resume_file.is_file():
        history, start_epoch, elapsed_before = _restore(resume_file, config, model, optimizer, scheduler, rngs,
                                                        device)

    meta: dict[str, Any] = {}
    t0 = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        epoch_start = time.perf_counter()
        train_loss = _train_epoch(model, loader, optimizer, scheduler, device, train_transform, aug_gen,
                                  f"epoch {epoch + 1}/{epochs}", progress)
        accuracy = evaluate_accuracy(model, test_ds, transform=eval_transform, device=device)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "test_accuracy": accuracy,
                "seconds": round(time.perf_counter() - epoch_start, 2),
            }
        )
        train_seconds = elapsed_before + time.perf_counter() - t0
        done = epoch + 1 == epochs
        meta = {
            "model": model_name,
            "checkpoint": out_path.name,
            "test_accuracy": accuracy,
            "epochs": epoch + 1,
            "epochs_planned": epochs,
            "complete": done,
            **config,
            **meta_extra,
            "train_seconds": round(train_seconds, 2),
            "torch_version": torch.__version__,
            "num_threads": torch.get_num_threads(),
            "device": str(device),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "history": history,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # Weights first, then metadata: the JSON never describes weights not on disk.
        _atomic_torch_save(_cpu_state_dict(model), out_path)
        _atomic_write_json(meta, metadata_path(out_path))
        if done:
            resume_file.unlink(missing_ok=True)
        else:
            _atomic_torch_save(_resume_state(config, epoch + 1, model, optimizer, scheduler, rngs, history,
                                             train_seconds, device), resume_file)
        if progress:
            # A summary line per epoch, also where the bars are hidden (logs, CI).
            print(f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, test accuracy {accuracy:.4%}",
                  flush=True)
    if not meta:  # nothing left to do (resumed after the last epoch)
        meta = json.loads(metadata_path(out_path).read_text())
    return meta


#: AdamW's weight decay in the ViTs' recipe.
VIT_WEIGHT_DECAY = 0.05


def _vit_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The usual recipe for a ViT: AdamW, 10% warm-up, then one-cycle decay (attention is unstable at a high rate
    early on)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)


def train_mnist(
    data_root: str | os.PathLike[str] | None = None,
    out_path: str | os.PathLike[str] = "checkpoints/mnist_cnn.pt",
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    progress: bool = True,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    model_name: str = "mnist",
) -> dict[str, Any]:
    """Train :class:`coreunits.models.MnistNet` (or another MNIST model) on the MNIST training set with Adam.

    Seeding is deterministic (weights and dropout from ``torch.manual_seed(seed)``,
    shuffling from its own generator), so a rerun on the same device and thread
    count gives the same weights. After every epoch the test accuracy is measured
    and the checkpoint plus its metadata JSON are written atomically.

    Args:
        data_root: Data root holding MNIST; default ``$COREUNITS_DATA``, else a
            download into the cache directory. The embedded sample is never used
            for training.
        out_path: Checkpoint path; the metadata goes to the same path with ``.json``.
        epochs: Number of epochs (default 3; 12 for the ViT).
        seed: Random seed.
        batch_size: Mini-batch size.
        lr: Adam learning rate (the ViT: AdamW's peak, one-cycle schedule with 10% warm-up).
        progress: Show tqdm progress bars and a summary line per epoch.
        resume: Continue from ``<out>.resume.pt`` if an interrupted run left one.
        device: Device to train on; default CUDA when available, else CPU.
        model_name: the :func:`coreunits.models.build_model` name (``"mnist_mlp"``: the MLP).

    Returns:
        The metadata dictionary that was written to the JSON file.

    Raises:
        MissingDataError: If MNIST is neither under the data root nor downloadable
            (a ``FileNotFoundError``).
    """
    root = locate_mnist(data_root, allow_download=True)
    train_ds = load_mnist(root, train=True)
    test_ds = load_mnist(root, train=False)
    dev = _resolve_device(device)

    torch.manual_seed(seed)
    model = build_model(model_name).to(dev)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    optimizer: torch.optim.Optimizer
    if model_name == "mnist_vit":
        epochs = 12 if epochs is None else epochs
        steps = epochs * math.ceil(len(train_ds) / batch_size)
        optimizer, scheduler = _vit_optimizer(model, lr, VIT_WEIGHT_DECAY, steps)
        config = {"seed": seed, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW-onecycle",
                  "weight_decay": VIT_WEIGHT_DECAY}
    else:
        epochs = 3 if epochs is None else epochs
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        config = {"seed": seed, "batch_size": batch_size, "lr": lr, "optimizer": "Adam"}
    extra = {
        "data_checksum": mnist_checksum(root, train=True),
        "test_data_checksum": mnist_checksum(root, train=False),
        "data_source": str(root),
        "train_size": len(train_ds),
        "test_size": len(test_ds),
    }
    return _fit(
        model_name=model_name,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_ds=train_ds,
        test_ds=test_ds,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        out_path=Path(out_path).expanduser(),
        config=config,
        meta_extra=extra,
        train_transform=None,
        eval_transform=None,
        resume=resume,
        progress=progress,
    )


def _cifar10_optimizer(model_name: str, model: nn.Module, lr: float | None, weight_decay: float | None, steps: int,
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, dict[str, Any]]:
    """(optimizer, schedule, their settings) of a CIFAR-10 model's recipe (see :func:`train_cifar10`)."""
    if model_name == "cifar10_vit":
        lr = 1e-3 if lr is None else lr
        weight_decay = VIT_WEIGHT_DECAY if weight_decay is None else weight_decay
        optimizer, scheduler = _vit_optimizer(model, lr, weight_decay, steps)
        return optimizer, scheduler, {"lr": lr, "optimizer": "AdamW-onecycle", "weight_decay": weight_decay}
    lr = 0.05 if lr is None else lr
    weight_decay = 5e-4 if weight_decay is None else weight_decay
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    return optimizer, scheduler, {"lr": lr, "optimizer": "SGD-nesterov", "weight_decay": weight_decay}


def train_cifar10(
    data_root: str | os.PathLike[str] | None = None,
    out_path: str | os.PathLike[str] = "checkpoints/cifar10_cnn.pt",
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 128,
    lr: float | None = None,
    progress: bool = True,
    *,
    resume: bool = True,
    device: str | torch.device | None = None,
    weight_decay: float | None = None,
    cache: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    model_name: str = "cifar10",
) -> dict[str, Any]:
    """Train :class:`coreunits.models.CifarNet` (or the CIFAR-10 ViT) on CIFAR-10.

    The CNN: SGD with Nesterov momentum 0.9 under a one-cycle learning-rate schedule
    peaking at ``lr`` (default 0.05, weight decay 5e-4). The ViT (``model_name="cifar10_vit"``):
    AdamW (default peak 1e-3, weight decay 0.05), 10% warm-up, one-cycle decay. Training
    batches get :func:`cifar10_train_transform` (random 24x24 crops, flips,
    brightness/contrast jitter); evaluation uses the central crop.
    Checkpoint, metadata and resume state are written after every epoch, and by
    default an interrupted run continues from the last finished epoch.

    Args:
        data_root: Data root with CIFAR-10 (see :func:`coreunits.data.load_cifar10`);
            default ``$COREUNITS_DATA``. CIFAR-10 is never downloaded.
        out_path: Checkpoint path; the metadata goes to the same path with ``.json``.
        epochs: Number of epochs (also fixes the length of the LR schedule).
        seed: Random seed.
        batch_size: Mini-batch size.
        lr: Peak learning rate of the one-cycle schedule (default: the model's recipe, see above).
        progress: Show tqdm progress bars and a summary line per epoch.
        resume: Continue from ``<out>.resume.pt`` when present.
        device: Device to train on; default CUDA when available, else CPU.
        weight_decay: Weight decay (default: the model's recipe).
        cache: Cache directory for the decoded JPEG arrays.
        limit: Use at most this many training and test images (smoke tests only).
        model_name: ``"cifar10"`` (the paper's CNN) or ``"cifar10_vit"``.

    Returns:
        The metadata dictionary that was written to the JSON file.

    Raises:
        FileNotFoundError: If no data root is given or CIFAR-10 is not found there.
    """
    root = resolve_data_root(data_root)
    if root is None:
        raise FileNotFoundError(
            f"CIFAR-10 needs a data root: pass data_root or set {DATA_ENV_VAR}"
        )
    train_ds = load_cifar10(root, train=True, cache=cache, limit=limit, progress=progress)
    test_ds = load_cifar10(root, train=False, cache=cache, limit=limit, progress=progress)
    dev = _resolve_device(device)

    torch.manual_seed(seed)
    model = build_model(model_name).to(dev)
    optimizer, scheduler, recipe = _cifar10_optimizer(model_name, model, lr, weight_decay,
                                                      epochs * math.ceil(len(train_ds) / batch_size))
    config = {
        "seed": seed,
        "batch_size": batch_size,
        **recipe,
        "schedule": "one-cycle",
        "epochs_planned": epochs,
        "limit": limit,
    }
    extra = {
        "data_source": str(root),
        "train_size": len(train_ds),
        "test_size": len(test_ds),
    }
    return _fit(
        model_name=model_name,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_ds=train_ds,
        test_ds=test_ds,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        out_path=Path(out_path).expanduser(),
        config=config,
        meta_extra=extra,
        train_transform=cifar10_train_transform,
        eval_transform=cifar10_eval_transform,
        resume=resume,
        progress=progress,
    )
