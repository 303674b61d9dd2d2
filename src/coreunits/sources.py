"""Where a model and its data come from: the command line's ``--model``, ``--weights`` and ``--data`` specs.

A model spec is one of

- ``torchvision:NAME`` (``torchvision.models``; ``--model-kwargs`` go to the builder),
- ``timm:NAME`` (``timm.create_model``; needs the ``timm`` extra),
- ``path/to/file.py:FACTORY`` (a function of that file that returns the model),
- ``file.pt2`` (a ``torch.export`` program, unflattened so its layers keep their names),
- ``file.ts`` (TorchScript: only ``--layer input`` can be gated, as ScriptModules take no hooks),
- ``coreunits:NAME`` (a classifier of this package, a key of ``coreunits.paper.MODELS``; ``--weights``
  defaults to its bundled checkpoint).

Weights are a ``state_dict`` in a ``.pt``/``.pth``/``.bin`` file (plain, or under a ``state_dict`` or ``model``
key) or a ``.safetensors`` file, loaded strictly: weights that do not fit say which keys. Without ``--weights``,
torchvision and timm models load their default pretrained weights (from the local cache; a download that
cannot happen says to pass ``--weights``).

A data spec is ``imagefolder:DIR``, ``mnist:ROOT``, ``cifar10:ROOT`` or ``torchvision:CLASS:ROOT`` (any class of
``torchvision.datasets``). Images become tensors in [0, 1], are resized and centre-cropped to ``--image-size``
when it is given, and normalised by ``--normalize`` (``imagenet``, ``none`` or ``MEAN,STD`` lists; by default the
preset of the model's pretrained weights where torchvision or timm has one, else none).

Only :mod:`coreunits.cli` knows argparse; everything here takes plain values and raises
:class:`~coreunits.OptionError` / :class:`~coreunits.MissingDataError` with one line that names the fix.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from coreunits._core.errors import MissingDataError, OptionError
from coreunits._core.layers import close_names
from coreunits.paper import MODELS

__all__ = [
    "IMAGENET_NORMALIZATION",
    "LoadedData",
    "LoadedModel",
    "Normalization",
    "load_data",
    "load_model",
    "load_weights",
    "model_classes",
    "parse_normalize",
]

logger = logging.getLogger(__name__)

Normalization = tuple[tuple[float, ...], tuple[float, ...]]

#: torchvision's ImageNet mean and standard deviation (``--normalize imagenet``).
IMAGENET_NORMALIZATION: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_BUNDLED = tuple(MODELS)
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class LoadedModel:
    """A model ready to explain: in eval mode, with where it came from and its weights' preprocessing preset."""

    model: nn.Module
    description: str
    normalization: Normalization | None = None
    gateable_input_only: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedData:
    """A data set of the model's inputs (labels, where there are any, are ignored) and its class names."""

    dataset: Dataset[Any]
    description: str
    class_names: list[str] | None = None


# --------------------------------------------------------------------------------------------- models
def _missing_extra(package: str, extra: str) -> OptionError:
    return OptionError(f"{package} is not installed; pip install 'coreunits[{extra}]' (or pip install {package})")


def _offline(what: str, err: BaseException) -> OptionError:
    return OptionError(
        f"could not fetch {what} ({type(err).__name__}: {' '.join(str(err).split())[:160]}); "
        "this machine is probably offline: pass --weights FILE (a state_dict .pt or .safetensors file)"
    )


def _unknown_name(kind: str, name: str, names: Sequence[str]) -> OptionError:
    close = close_names(name, list(names))
    hint = f"closest names: {', '.join(close)}" if close else f"{len(names)} names are known, e.g. {', '.join(names[:5])}"
    return OptionError(f"{kind} has no model named {name!r}; {hint}")


def _torchvision_model(name: str, kwargs: dict[str, Any], pretrained: bool) -> tuple[nn.Module, Normalization | None]:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise _unknown_name("torchvision.models", name, names)
    preset: Normalization | None = None
    try:
        weights_enum = torchvision.models.get_model_weights(name)
        default = weights_enum.DEFAULT  # type: ignore[attr-defined]
        preset = (tuple(default.transforms().mean), tuple(default.transforms().std))
    except (ValueError, AttributeError):
        default = None  # an architecture torchvision ships without weights
    if pretrained and default is None:
        raise OptionError(f"torchvision has no pretrained weights for {name}; pass --weights FILE")
    try:
        model = torchvision.models.get_model(name, weights=default if pretrained else None, **kwargs)
    except TypeError as err:
        raise OptionError(f"torchvision:{name} does not take these --model-kwargs: {err}") from None
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        if pretrained:
            raise _offline(f"torchvision's default weights of {name}", err) from None
        raise
    return model, preset


def _timm_model(name: str, kwargs: dict[str, Any], pretrained: bool) -> tuple[nn.Module, Normalization | None]:
    try:
        import timm
    except ImportError:
        raise _missing_extra("timm", "timm") from None
    if not timm.is_model(name):
        raise _unknown_name("timm", name, timm.list_models())
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise OptionError(f"timm:{name} does not take these --model-kwargs: {err}") from None
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise _offline(f"timm's pretrained weights of {name}", err) from None
        raise
    cfg = getattr(model, "pretrained_cfg", None) or {}
    preset = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else None
    return model, preset


def _factory_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    path_text, _, factory = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise MissingDataError(f"model file {path} not found; --model path/to/file.py:FACTORY names a Python file")
    module_name = f"coreunits_user_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise OptionError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    module_spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module_name]
        raise OptionError(f"{path} has no function {factory!r}; its functions and classes: {', '.join(found) or 'none'}")
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise OptionError(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _exported_model(path: Path) -> nn.Module:
    program = torch.export.load(str(path))
    # unflatten keeps the original module hierarchy, so --layer names match the model's own.
    return torch.export.unflatten(program)


def _scripted_model(path: Path) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but users still have .ts files
        return torch.jit.load(str(path), map_location="cpu")


def _bundled_model(name: str, weights: str | None) -> nn.Module:
    from coreunits.paper import default_checkpoint
    from coreunits.train import load_named_or

    if name not in _BUNDLED:
        raise _unknown_name("coreunits", name, list(_BUNDLED))
    checkpoint = Path(weights) if weights else default_checkpoint(name)
    return load_named_or(checkpoint, name)


def load_model(spec: str, model_kwargs: dict[str, Any] | None = None, weights: str | None = None) -> LoadedModel:
    """Build the model ``spec`` names (see the module docstring), load ``weights`` into it, and put it in eval mode.

    Raises:
        OptionError: an unknown name (with the closest ones), kwargs the builder does not take, weights that do
            not fit (which keys), or pretrained weights that cannot be fetched (pass ``weights``).
        MissingDataError: a file that is not there.
    """
    kwargs = dict(model_kwargs or {})
    kind, _, name = spec.partition(":")
    preset: Normalization | None = None
    input_only = False
    if kind == "torchvision" and name:
        model, preset = _torchvision_model(name, kwargs, pretrained=weights is None)
    elif kind == "timm" and name:
        model, preset = _timm_model(name, kwargs, pretrained=weights is None)
    elif kind == "coreunits" and name:
        return LoadedModel(_bundled_model(name, weights).eval(), f"coreunits {name} ({weights or 'bundled checkpoint'})")
    elif spec.endswith((".pt2", ".ts")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MissingDataError(f"model file {path} not found")
        if kwargs or weights:
            raise OptionError(f"{path.name} carries its weights and arguments; drop --model-kwargs and --weights")
        input_only = spec.endswith(".ts")
        model = _scripted_model(path) if input_only else _exported_model(path)
        return LoadedModel(model.eval(), f"{'TorchScript' if input_only else 'torch.export'} model {path}",
                           gateable_input_only=input_only)
    elif ".py:" in spec:
        model = _factory_model(spec, kwargs)
    else:
        raise OptionError(
            f"--model {spec!r} is not a model spec; use torchvision:NAME, timm:NAME, path/to/file.py:FACTORY, "
            "file.pt2 (torch.export), file.ts (TorchScript) or coreunits:" + "|".join(_BUNDLED)
        )
    if weights is not None:
        load_weights(model, weights, spec)
    source = f"weights {weights}" if weights else "default pretrained weights" if kind in ("torchvision", "timm") \
        else "the factory's own weights"
    return LoadedModel(model.eval(), f"{spec} with {source}", normalization=preset, gateable_input_only=input_only)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise _missing_extra("safetensors", "safetensors") from None
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- a pickle of arbitrary objects, or not a torch file at all
        raise OptionError(f"{path} is not a state_dict file torch.load can read safely ({type(err).__name__}); "
                          "save the weights with torch.save(model.state_dict(), path) or as .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OptionError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    # Checkpoints saved from DataParallel / DistributedDataParallel prefix every key with "module.".
    if state and not (set(state) & expected) and all(k.startswith("module.") for k in state):
        logger.info("weights: stripped the 'module.' prefix of a DataParallel checkpoint")
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _keys(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_weights(model: nn.Module, weights: str | Path, spec: str = "the model") -> None:
    """Load a state_dict file into ``model`` strictly; a misfit names the keys and shapes that differ."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingDataError(f"weights file {path} not found")
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise OptionError(f"--weights {path.name}: expected a state_dict file ({', '.join(_WEIGHT_SUFFIXES)})")
    own = model.state_dict()
    state = _strip_prefix(_read_state_dict(path), set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {_keys(missing)}"] if missing else []) \
            + ([f"unexpected keys {_keys(unexpected)}"] if unexpected else []) \
            + ([f"shapes differ: {_keys(shapes, 2)}"] if shapes else [])
        raise OptionError(f"weights {path.name} do not fit {spec}: {'; '.join(parts)}. Build the model with the "
                          "arguments the weights were trained with (--model-kwargs, e.g. '{\"num_classes\": 3}')")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------- data
def parse_normalize(text: str | None, preset: Normalization | None) -> Normalization | None:
    """``--normalize``: ``imagenet``, ``none``, ``MEAN,STD`` (``0.5,0.25`` or ``0.4,0.5,0.6,0.2,0.2,0.2``), or the preset."""
    if text is None:
        return preset
    if text == "none":
        return None
    if text == "imagenet":
        return IMAGENET_NORMALIZATION
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) < 2 or len(values) % 2 or any(v <= 0 for v in values[len(values) // 2:]):
        raise OptionError(f"--normalize {text!r}: use imagenet, none, or MEAN,STD with one value per channel each "
                          "(e.g. 0.5,0.25 or 0.485,0.456,0.406,0.229,0.224,0.225) and positive STD")
    half = len(values) // 2
    return tuple(values[:half]), tuple(values[half:])


def _transform(image_size: int | None, normalization: Normalization | None,
               first: Any = None) -> Callable[[Any], torch.Tensor]:
    """PIL image (or, with ``first``, a tensor) -> float tensor in [0, 1], resized/cropped, normalised."""
    from torchvision import transforms

    steps: list[Any] = [first if first is not None else transforms.ToTensor()]
    if image_size:
        steps += [transforms.Resize(image_size, antialias=True), transforms.CenterCrop(image_size)]
    if normalization is not None:
        steps.append(transforms.Normalize(*normalization))
    return transforms.Compose(steps)


class _Transformed(Dataset[Any]):
    """The (image tensor, label) items of the package's own loaders, through a torchvision transform."""

    def __init__(self, base: Dataset[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.base[i]
        return self.transform(x), y


def _image_folder(root: Path, transform: Callable[[Any], torch.Tensor]) -> LoadedData:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise MissingDataError(f"image folder {root} not found; imagefolder:DIR wants DIR/<class>/<image files>")
    try:
        ds = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise MissingDataError(f"no images in {root} ({' '.join(str(err).split())[:120]}); imagefolder:DIR wants "
                               "one folder per class, each with .jpg/.png/... files") from None
    return LoadedData(ds, f"image folder {root} ({len(ds)} images, {len(ds.classes)} classes)", list(ds.classes))


def _torchvision_dataset(name: str, root: Path, split: str, transform: Callable[[Any], torch.Tensor]) -> LoadedData:
    import torchvision.datasets as tvd

    names = [n for n in tvd.__all__ if inspect.isclass(getattr(tvd, n, None))]
    if name not in names:
        raise OptionError(f"torchvision.datasets has no data set {name!r}; "
                          f"closest: {', '.join(close_names(name, names)) or ', '.join(names[:8])}")
    cls = getattr(tvd, name)
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"transform": transform}
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    if "download" in params:
        kwargs["download"] = False
    try:
        ds = cls(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise MissingDataError(f"torchvision.datasets.{name} found no data under {root} "
                               f"({' '.join(str(err).split())[:120]}); put the data set's files there") from None
    classes = getattr(ds, "classes", None)
    return LoadedData(ds, f"torchvision.datasets.{name} {root} ({split}, {len(ds)} items)",
                      list(classes) if classes else None)


def _bundled_data(kind: str, root: Path, split: str, image_size: int | None,
                  normalization: Normalization | None) -> LoadedData:
    from torchvision import transforms

    from coreunits.data import CIFAR10_CLASSES, get_mnist, load_cifar10

    if kind == "mnist":  # float images in [0, 1] already
        ds, source = get_mnist(root, train=split == "train", allow_download=False, allow_sample=False)
        names, first = [str(d) for d in range(10)], transforms.Lambda(lambda x: x)
    else:  # uint8 images
        ds = load_cifar10(root, train=split == "train", progress=False)
        source, names = f"CIFAR-10 {split} split under {root} ({len(ds)} images)", list(CIFAR10_CLASSES)
        first = transforms.ConvertImageDtype(torch.float32)
    return LoadedData(_Transformed(ds, _transform(image_size, normalization, first)), source, names)


def load_data(spec: str, *, split: str = "test", image_size: int | None = None,
              normalization: Normalization | None = None, max_inputs: int | None = None,
              seed: int = 0) -> LoadedData:
    """The data set ``spec`` names (see the module docstring), as tensors the model takes.

    ``max_inputs`` keeps a seeded random subset of that many inputs (D'_c is built from all of what remains).
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise OptionError(f"--data {spec!r} is not a data spec; use imagefolder:DIR, mnist:ROOT, cifar10:ROOT "
                          "or torchvision:CLASS:ROOT")
    if image_size is not None and image_size < 1:
        raise OptionError(f"--image-size must be a positive number of pixels, got {image_size}")
    if kind == "imagefolder":
        loaded = _image_folder(Path(rest).expanduser(), _transform(image_size, normalization))
    elif kind in ("mnist", "cifar10"):
        loaded = _bundled_data(kind, Path(rest).expanduser(), split, image_size, normalization)
    elif kind == "torchvision":
        name, _, root = rest.partition(":")
        if not root:
            raise OptionError(f"--data {spec!r}: torchvision data sets are given as torchvision:CLASS:ROOT")
        loaded = _torchvision_dataset(name, Path(root).expanduser(), split, _transform(image_size, normalization))
    else:
        raise OptionError(f"--data {spec!r}: unknown kind {kind!r}; use imagefolder:DIR, mnist:ROOT, cifar10:ROOT "
                          "or torchvision:CLASS:ROOT")
    if len(loaded.dataset) == 0:  # type: ignore[arg-type]
        raise MissingDataError(f"{loaded.description} holds no inputs")
    loaded.dataset, note = random_subset(loaded.dataset, max_inputs, seed)
    loaded.description += note
    return loaded


def random_subset(dataset: Any, max_inputs: int | None, seed: int = 0) -> tuple[Any, str]:
    """(a seeded random ``max_inputs`` of ``dataset``'s inputs, in their order, or all of it; what was kept, said)."""
    size = len(dataset)
    if max_inputs is None or max_inputs >= size:
        return dataset, ""
    if max_inputs < 1:
        raise OptionError(f"--max-inputs must be >= 1, got {max_inputs}")
    keep = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:max_inputs].sort().values
    return Subset(dataset, keep.tolist()), f"; a random {max_inputs} of them (seed {seed})"


def model_classes(model: nn.Module, dataset: Dataset[Any]) -> int:
    """How many classes ``model`` scores, from its output on the data's first two inputs.

    Raises:
        OptionError: the model fails on the data's inputs (wrong size or channels, a fixed batch size), with
            the model's own message and what to check.
    """
    try:
        items = [dataset[i] for i in range(min(2, len(dataset)))]  # type: ignore[arg-type]
        x = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
    except Exception as err:  # noqa: BLE001 -- a transform that does not fit the images, an unreadable file
        raise OptionError(f"the data's first inputs cannot be prepared ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:160]}); check --normalize (one MEAN and one STD per "
                          "channel) and --image-size") from None
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 -- any failure of the user's forward here is a model/data mismatch
        message = " ".join(str(err).split())[:200]
        raise OptionError(f"the model fails on the data's inputs of shape {tuple(x.shape[1:])} ({type(err).__name__}: "
                          f"{message}); check --image-size, --normalize, --model-kwargs and that the data suits the "
                          "model (an exported .pt2 needs a dynamic batch dimension)") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise OptionError(f"the model returns {type(out).__name__}"
                          + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
                          + ", not (batch, classes) scores; wrap it in a file.py:FACTORY that returns the logits")
    return int(out.shape[1])
