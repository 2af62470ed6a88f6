"""Data loaders: IDX files (written here), the missing-files and corrupt-file messages, digits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from support import write_cifar10, write_idx, write_image_folder

from hpsearch.data import channel_stats, load
from hpsearch.errors import DataError
from hpsearch.spec import DataSpec


def test_mnist_idx_files_load_split_and_normalise(tmp_path: Path) -> None:
    write_idx(tmp_path, n_train=300, n_test=100)
    ds = load(DataSpec(dataset="mnist", root=str(tmp_path), download=False, val_fraction=0.2), seed=0)
    assert ds.train.x.shape == (240, 1, 28, 28) and ds.train.x.dtype == np.uint8
    assert len(ds.val) == 60 and len(ds.test) == 100 and ds.num_classes == 10
    assert ds.for_trials().test is None  # trials never see the test split
    again = load(DataSpec(dataset="mnist", root=str(tmp_path), download=False, val_fraction=0.2), seed=0)
    assert np.array_equal(ds.val.y, again.val.y)  # the split is seeded
    other = load(DataSpec(dataset="mnist", root=str(tmp_path), download=False, val_fraction=0.2), seed=1)
    assert not np.array_equal(ds.val.y, other.val.y)


def test_torchvision_layout_is_found(tmp_path: Path) -> None:
    write_idx(tmp_path / "MNIST" / "raw")
    ds = load(DataSpec(dataset="mnist", root=str(tmp_path), download=False), seed=0)
    assert len(ds.train) + len(ds.val) == 300


def test_missing_files_without_download_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load(DataSpec(dataset="mnist", root=str(tmp_path), download=False), seed=0)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and "download: true" in msg


def test_failed_download_says_where_to_put_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real download attempt through torchvision, through a proxy that refuses at once (no network
    # wait): the failure path users without network access meet.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(DataError) as e:
        load(DataSpec(dataset="mnist", root=str(tmp_path / "cache"), download=True), seed=0)
    msg = str(e.value)
    assert "could not download mnist" in msg and "download: false" in msg
    assert str(tmp_path / "cache") in msg and "t10k-labels-idx1-ubyte.gz" in msg


def test_truncated_file_is_named(tmp_path: Path) -> None:
    write_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: .* truncated"):
        load(DataSpec(dataset="mnist", root=str(tmp_path), download=False), seed=0)


def test_not_an_idx_file(tmp_path: Path) -> None:
    write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: cannot be read"):
        load(DataSpec(dataset="mnist", root=str(tmp_path), download=False), seed=0)


def test_digits_has_a_seeded_test_split() -> None:
    ds = load(DataSpec(dataset="digits", val_fraction=0.2, test_fraction=0.2), seed=0)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert len(ds.test) == 359 and ds.input_shape == (1, 8, 8) and ds.scale == 16.0


def test_digits_are_scikit_learn_s_digits_read_without_importing_it() -> None:
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from hpsearch.data import _digits_arrays

    images, labels = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    # In a fresh interpreter, loading digits leaves scikit-learn unimported.
    code = ("import sys; from hpsearch.data import load; from hpsearch.spec import DataSpec; "
            "load(DataSpec(dataset='digits'), seed=0); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_image_folder_loads_with_the_right_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", per_class=10)
    ds = load(DataSpec(dataset="image_folder", root=str(tmp_path / "pets"), image_size=16, val_fraction=0.2,
                       test_fraction=0.2), seed=0)
    assert ds.classes == ("cat", "dog", "frog") and ds.num_classes == 3
    assert ds.input_shape == (3, 16, 16) and ds.train.x.dtype == np.uint8
    assert len(ds.train) + len(ds.val) + len(ds.test) == 30 and len(ds.test) == 6
    # Labels follow the sorted folder names: every "frog" image is red-free and blue-heavy.
    x = np.concatenate([ds.train.x, ds.val.x]).astype(float)
    y = np.concatenate([ds.train.y, ds.val.y])
    for label in range(3):
        assert x[y == label][:, label].mean() > 150
    assert len(ds.mean) == 3 and len(ds.std) == 3


def test_image_folder_with_train_and_test_folders_and_streaming(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "set" / "train", per_class=8)
    write_image_folder(tmp_path / "set" / "test", per_class=2, seed=1)
    ds = load(DataSpec(dataset="image_folder", root=str(tmp_path / "set"), image_size=12, loader="stream"), seed=0)
    assert ds.streamed and ds.train.x is None and len(ds.train) + len(ds.val) == 24 and len(ds.test) == 6
    assert all(Path(f).parent.parent == tmp_path / "set" / "test" for f in ds.test.files)
    from hpsearch.data import ImageFiles

    image, label = ImageFiles(ds.train, 12)[0]
    assert tuple(image.shape) == (3, 12, 12) and str(image.dtype) == "torch.uint8" and label == ds.train.y[0]


def test_image_folder_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        load(DataSpec(dataset="image_folder", root=str(tmp_path / "nowhere")), seed=0)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty/cat: no images"):
        load(DataSpec(dataset="image_folder", root=str(tmp_path / "empty")), seed=0)
    write_image_folder(tmp_path / "bad", per_class=3)
    (tmp_path / "bad" / "dog" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"dog/9.png: cannot be read as an image"):
        load(DataSpec(dataset="image_folder", root=str(tmp_path / "bad")), seed=0)


def test_cifar10_batches_load(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    ds = load(DataSpec(dataset="cifar10", root=str(tmp_path), download=False, val_fraction=0.1), seed=0)
    assert ds.input_shape == (3, 32, 32) and len(ds.train) + len(ds.val) == 200 and len(ds.test) == 40
    assert ds.classes[0] == "airplane" and ds.num_classes == 10
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load(DataSpec(dataset="cifar10", root=str(tmp_path / "none"), download=False), seed=0)


def test_channel_stats_of_uint8_images_match_numpy() -> None:
    # The histogram path for uint8 images must give numpy's own per-channel mean and std.
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (500, 3, 8, 8), dtype=np.uint8)
    x[:, 1] //= 4  # channels with different statistics
    mean, std = channel_stats(x, 255.0)
    as_float = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 2, 3)), rtol=1e-10)
    # A constant channel has std 1, not 0 (normalising divides by it).
    assert channel_stats(np.full((4, 1, 2, 2), 7, dtype=np.uint8), 255.0)[1] == (1.0,)
    assert channel_stats(np.full((4, 1, 2, 2), 7.0), 16.0)[1] == (1.0,)


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_normalising_never_writes_the_data_it_is_given(dtype: str) -> None:
    # On the CPU a trial's arrays are views of Ray's shared object store: written in place, the
    # data would be normalised once more by every trial process that maps it.
    import torch

    from hpsearch.data import Split, to_device

    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, (50, 64)).astype(dtype)
    original = x.copy()
    data = load(DataSpec(dataset="digits"), seed=0)
    split = Split(x, np.zeros(50, dtype=np.int64))
    first, _ = to_device(split, data, torch.device("cpu"))
    second, _ = to_device(split, data, torch.device("cpu"))
    np.testing.assert_array_equal(x, original)
    assert first.dtype == torch.float32 and torch.equal(first, second)
    mean, std = np.array(data.mean), np.array(data.std)
    np.testing.assert_allclose(first.numpy(), (original / data.scale - mean) / std, rtol=1e-5, atol=1e-5)
