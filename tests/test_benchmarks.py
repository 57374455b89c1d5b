"""Benchmarks: every image source gives Avalanche's SplitCIFAR split; subsets; task labels; data checks."""

import numpy as np
import pytest
import torch
from PIL import Image

import avalanche.benchmarks.datasets.external_datasets.cifar as av_cifar
from avalanche.benchmarks.classic import SplitCIFAR10
from experiments.benchmarks import ArrayImageDataset, arrays_benchmark, load_arrays, split_cifar10, split_cifar100


def _make_arrays(n_classes=10, per_class=6, size=32, grey=False, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size) if grey else (size, size, 3)
    def split(n):
        y = np.repeat(np.arange(n_classes), n)
        return rng.integers(0, 256, (len(y), *shape), dtype=np.uint8), y.astype(np.int64)
    xtr, ytr = split(per_class)
    xte, yte = split(per_class // 2)
    return dict(x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                class_names=np.array([f"c{i}" for i in range(n_classes)]))


@pytest.fixture
def cifar_like(tmp_path):
    arrays = _make_arrays()
    path = tmp_path / "cifar10.npz"
    np.savez(path, **arrays)
    return path, arrays


def _stream_tensors(stream):
    return [torch.stack([s[0] for s in exp.dataset]) for exp in stream]


def test_arrays_source_matches_avalanche_split_cifar10(cifar_like, monkeypatch):
    path, a = cifar_like
    mine = split_cifar10(5, seed=1234, data=path)
    monkeypatch.setattr(
        "avalanche.benchmarks.classic.ccifar10.get_cifar10_dataset",
        lambda root: (ArrayImageDataset(a["x_train"], a["y_train"]), ArrayImageDataset(a["x_test"], a["y_test"])),
    )
    ref = SplitCIFAR10(5, seed=1234)
    assert mine.classes_order == ref.classes_order == [5, 4, 8, 2, 6, 9, 1, 7, 0, 3]
    for e_mine, e_ref in zip(mine.test_stream, ref.test_stream):
        assert e_mine.classes_in_this_experience == e_ref.classes_in_this_experience
    for t_mine, t_ref in zip(_stream_tensors(mine.test_stream), _stream_tensors(ref.test_stream)):
        torch.testing.assert_close(t_mine, t_ref)  # same images, same eval transform
    assert mine.data_source.startswith("arrays:")


def test_env_var_download_and_imagefolder_sources_agree(cifar_like, tmp_path, monkeypatch):
    path, a = cifar_like
    ref = _stream_tensors(split_cifar10(2, seed=7, data=path).test_stream)

    monkeypatch.setenv("LOWRANK_CL_DATA", str(path.parent))
    bm = split_cifar10(2, seed=7)
    assert bm.data_source == f"arrays:{path}"
    monkeypatch.delenv("LOWRANK_CL_DATA")

    calls = []
    def fake_download(root):
        calls.append(root)
        return ArrayImageDataset(a["x_train"], a["y_train"]), ArrayImageDataset(a["x_test"], a["y_test"])
    monkeypatch.setattr(av_cifar, "get_cifar10_dataset", fake_download)
    bm = split_cifar10(2, seed=7, dataset_root=tmp_path / "dl")
    assert calls == [tmp_path / "dl"] and bm.data_source.startswith("torchvision:")
    for t, r in zip(_stream_tensors(bm.test_stream), ref):
        torch.testing.assert_close(t, r)

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for i, (img, y) in enumerate(zip(a[f"x_{split}"], a[f"y_{split}"])):
            d = root / split / f"class{y:02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")
    bm = split_cifar10(2, seed=7, data=root)
    assert bm.data_source.startswith("imagefolder:")
    for t, r in zip(_stream_tensors(bm.test_stream), ref):
        # ImageFolder orders files by name within a class, the arrays by index: compare as sets of images
        assert sorted(t.flatten(1).sum(1).tolist()) == pytest.approx(sorted(r.flatten(1).sum(1).tolist()), abs=1e-3)


def test_subset_and_task_labels(cifar_like):
    path, _ = cifar_like
    bm = split_cifar10(5, seed=0, data=path, subset=4, eval_subset=2, return_task_id=True)
    for i, exp in enumerate(bm.train_stream):
        assert len(exp.dataset) == 4
        assert exp.task_labels == [i]
        ys = sorted(int(s[1]) for s in exp.dataset)
        assert ys == [0, 0, 1, 1]  # class ids from 0 in each experience, balanced
    assert [len(e.dataset) for e in bm.test_stream] == [2] * 5
    x, y, t = bm.train_stream[3].dataset[0]
    assert x.shape == (3, 32, 32) and t == 3


def test_split_cifar100_from_made_arrays(tmp_path):
    path = tmp_path / "c100.npz"
    np.savez(path, **_make_arrays(n_classes=100, per_class=2))
    bm = split_cifar100(10, seed=1, data=path)
    assert len(bm.train_stream) == 10 and all(len(e.classes_in_this_experience) == 10 for e in bm.train_stream)
    assert sorted(bm.classes_order) == list(range(100))
    assert bm.normalization[0] == (0.5071, 0.4865, 0.4409)


def test_arrays_benchmark_grey_to_rgb_and_resize(tmp_path):
    path = tmp_path / "digits.npz"
    np.savez(path, **_make_arrays(n_classes=4, per_class=4, size=28, grey=True))
    bm = arrays_benchmark(path, 2, seed=0, image_size=32)
    x, y, t = bm.train_stream[0].dataset[0]
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0], x[1])
    allx = torch.stack([s[0] for e in bm.train_stream for s in e.dataset])
    assert abs(allx.mean().item()) < 0.1  # normalised with the training set's own statistics


def test_real_mnist_arrays(mnist_npz):
    bm = arrays_benchmark(mnist_npz, 5, seed=0, image_size=32, subset=20, eval_subset=10)
    assert [len(e.dataset) for e in bm.train_stream] == [20] * 5
    assert bm.train_stream[0].dataset[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.pop("y_test"), "lacks the keys"),
        (lambda a: a.update(x_train=a["x_train"][:, :, :, :2]), "must be uint8 of shape"),
        (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "must be uint8"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "integer labels of shape"),
        (lambda a: a.update(y_test=a["y_test"] + 5), "outside \\[0, 10\\)"),
        (lambda a: a.update(y_train=a["y_train"] - 1), "negative labels"),
    ],
)
def test_malformed_arrays_are_refused(tmp_path, mutate, match):
    a = _make_arrays()
    mutate(a)
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(ValueError, match=match):
        split_cifar10(5, seed=0, data=path)


def test_other_bad_benchmark_input(tmp_path, cifar_like):
    path, _ = cifar_like
    with pytest.raises(FileNotFoundError, match="Data file not found"):
        load_arrays(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_arrays(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="n_experiences=3 does not split the 10 classes"):
        split_cifar10(3, seed=0, data=path)
    with pytest.raises(ValueError, match="Pass seed="):
        split_cifar10(5, data=path)
    with pytest.raises(ValueError, match="images must be \\(N, 32, 32, 3\\)"):
        p2 = tmp_path / "small.npz"
        np.savez(p2, **_make_arrays(size=28))
        split_cifar10(5, seed=0, data=p2)


def test_failed_download_names_the_offline_options(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWRANK_CL_DATA", raising=False)
    def offline(root):
        raise OSError("Name or service not known")
    monkeypatch.setattr(av_cifar, "get_cifar10_dataset", offline)
    with pytest.raises(FileNotFoundError, match="LOWRANK_CL_DATA"):
        split_cifar10(5, seed=0, dataset_root=tmp_path)
