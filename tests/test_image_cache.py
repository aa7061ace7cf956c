"""laid.image_cache (resized images on disk), laid.loading (DataLoader settings) and `laid data cache`."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import fetch_image

from laid.cli import main
from laid.data import synth_benchmark
from laid.image_cache import ImageCache, fill_cache, image_cache_dir
from laid.loading import BY_VALUE_BYTES, ByValue, by_value, default_workers, loader_options, prefetched
from laid.tiny import save_tiny_processor


@pytest.fixture()
def photo(tmp_path):
    """A 640x480 noise JPEG (COCO-sized), which fetch_image resizes to 644x476 at qwen-vl-utils' defaults."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path)
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _is_array(pixels) -> bool:
    """What ImageCache.load returns: the uint8 pixels [H, W, 3] themselves, not a PIL image."""
    return isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


def test_a_hit_is_exactly_what_fetch_image_gives(tmp_path, photo):
    item = {"image": str(photo)}
    cache = ImageCache(tmp_path / "cache")
    first, second = cache.load(item), cache.load(item)
    expected = _pixels(fetch_image(item))
    assert (cache.misses, cache.hits) == (1, 1)
    assert _is_array(first) and _is_array(second) and first.shape == second.shape == (476, 644, 3)
    assert np.array_equal(first, expected) and np.array_equal(second, expected)
    assert cache.path(item).is_file() and not list(cache.path(item).parent.glob("*.tmp"))


def test_a_changed_file_or_bound_is_a_miss_never_a_stale_image(tmp_path, photo):
    cache = ImageCache(tmp_path / "cache")
    small = {"image": str(photo), "max_pixels": 112 * 112}
    assert cache.load(small).shape != cache.load({"image": str(photo)}).shape  # other bounds, other entries
    assert cache.misses == 2
    Image.fromarray(np.zeros((480, 640, 3), dtype=np.uint8)).save(photo)  # same path, new content
    os.utime(photo, ns=(1, 1))  # even with an old modification time, the size differs
    assert cache.load(small).max() == 0 and cache.misses == 3


def test_an_unreadable_entry_is_rewritten(tmp_path, photo):
    item = {"image": str(photo)}
    cache = ImageCache(tmp_path / "cache")
    cache.load(item)
    cache.path(item).write_bytes(b"truncated")
    assert np.array_equal(cache.load(item), _pixels(fetch_image(item))) and cache.misses == 2
    assert np.array_equal(ImageCache(tmp_path / "cache").load(item), _pixels(fetch_image(item)))


def _load_in_process(args):
    folder, path = args
    return ImageCache(folder).load({"image": path}).tobytes()


def test_processes_filling_one_entry_at_once_agree(tmp_path, photo):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_load_in_process, [(str(tmp_path / "cache"), str(photo))] * 8)
    assert len(set(results)) == 1 and results[0] == _pixels(fetch_image({"image": str(photo)})).tobytes()
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))


def test_no_cache_and_folder_settings(tmp_path, photo, monkeypatch):
    cache = ImageCache(None)
    cache.load({"image": str(photo)})
    assert cache.misses == 1 and image_cache_dir("none") is None and image_cache_dir(None) is None
    monkeypatch.setenv("LAID_CACHE_DIR", str(tmp_path / "root"))
    assert image_cache_dir("auto") == tmp_path / "root" / "images"
    assert image_cache_dir(str(tmp_path / "x")) == tmp_path / "x"
    with pytest.raises(FileNotFoundError, match="missing.jpg not found"):
        ImageCache(tmp_path).load({"image": str(tmp_path / "missing.jpg")})


def test_loader_options_fit_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 1
    assert loader_options(None, torch.device("cpu")) == {"num_workers": 1, "pin_memory": False,
                                                        "prefetch_factor": 2, "persistent_workers": True}
    assert loader_options(0, torch.device("cuda")) == {"num_workers": 0, "pin_memory": True}
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        loader_options(-1, torch.device("cpu"))


def _tensors():
    """Small tensors of several dtypes and shapes (0-d, empty, a non-contiguous view) and two larger ones."""
    return {"ids": torch.arange(7), "grid": torch.tensor([[1, 4, 6]]), "pixels": torch.arange(99, dtype=torch.uint8),
            "half": torch.linspace(-2, 2, 6, dtype=torch.bfloat16).view(2, 3), "scalar": torch.tensor(2.5),
            "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "view": torch.arange(12.0).view(3, 4).t(),
            "at_limit": torch.ones(BY_VALUE_BYTES, dtype=torch.uint8),
            "nested": [{"deep": (torch.arange(3, dtype=torch.int32), "text")}],
            "large": torch.arange(BY_VALUE_BYTES // 8 + 1), "number": 3}


class _Items(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return _tensors()


def _leaves(value, key=""):
    """(path, leaf) of every value in nested dicts / lists / tuples."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{key}/{k}")]
    if isinstance(value, (list, tuple)):
        return [leaf for k, v in enumerate(value) for leaf in _leaves(v, f"{key}/{k}")]
    return [(key, value)]


def test_small_tensors_leave_a_worker_by_value_large_ones_through_shared_memory():
    expected = _leaves(_tensors())
    loader = torch.utils.data.DataLoader(_Items(), batch_size=None, num_workers=1,
                                         collate_fn=by_value(torch.utils.data.default_convert))
    for batch in loader:
        got = _leaves(batch)
        assert [k for k, _ in got] == [k for k, _ in expected]
        for (key, value), (_, want) in zip(got, expected):
            if not isinstance(want, torch.Tensor):
                assert value == want, key
                continue
            assert isinstance(value, torch.Tensor), key
            assert value.dtype == want.dtype and value.shape == want.shape and torch.equal(value, want), key
            # torch's own transfer leaves a tensor in shared memory; by value it arrives in ordinary memory
            assert value.is_shared() == (key == "/large"), key
    items = [_tensors()]
    assert by_value(lambda batch: batch)(items) is items  # in the main process (num_workers=0): unchanged
    small = torch.arange(5.0)
    back = pickle.loads(pickle.dumps(ByValue(small)))
    assert back.dtype == small.dtype and torch.equal(back, small) and back.add_(1)[0] == 1  # writable


class _Source:
    """An iterator of 0, 1, ... n - 1 that records which thread took each item and raises at ``fail_at``."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at, self.taken = n, fail_at, []

    def __iter__(self):
        return self

    def __next__(self):
        k = len(self.taken)
        if k == self.n:
            raise StopIteration
        self.taken.append(threading.current_thread())
        if k == self.fail_at:
            raise RuntimeError(f"item {k} is broken")
        return k


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_prefetched_batches_arrive_in_order_received_ahead_by_a_thread():
    source = _Source(10)
    batches = prefetched(source, depth=2)
    assert next(batches) == 0
    assert source.taken[0] is threading.current_thread()  # the first on the caller's thread (accelerate's RNG sync)
    # while the caller holds item 0, the thread receives ahead: 2 queued and one more in its hand, never more
    assert _wait_for(lambda: len(source.taken) == 4)
    time.sleep(0.1)
    assert len(source.taken) == 4 and all(t is not threading.current_thread() for t in source.taken[1:])
    assert list(batches) == list(range(1, 10))
    assert list(prefetched(_Source(5), depth=0)) == list(range(5)) and list(prefetched(_Source(0))) == []
    with pytest.raises(ValueError, match="depth must be >= 0"):
        next(prefetched(_Source(3), depth=-1))


def test_prefetched_raises_where_the_source_failed_and_closing_stops_the_thread():
    got = []
    with pytest.raises(RuntimeError, match="item 3 is broken"):
        for item in prefetched(_Source(10, fail_at=3), depth=2):
            got.append(item)
    assert got == [0, 1, 2]
    source = _Source(1000)
    batches = prefetched(source, depth=2)
    next(batches)
    assert _wait_for(lambda: len(source.taken) == 4)
    batches.close()  # what the trainer does at the end of an epoch or of the run
    assert not any(t.name == "laid-prefetch" for t in threading.enumerate())
    assert len(source.taken) == 4  # the thread stopped instead of draining the source


def test_data_cache_cli_fills_the_cache_for_eval_and_training_bounds(tmp_path, capsys):
    data = synth_benchmark(tmp_path / "vhs", sizes=[1, 3], n_entries=3)
    args = ["data", "cache", str(data), "--image-root", str(data), "--cache", str(tmp_path / "cache")]
    assert main(args + ["--num-workers", "0"]) == 0
    first = capsys.readouterr().out
    n_images = len({p.name for p in data.glob("**/*.png")})
    assert f"{n_images} images ({n_images} added" in first
    assert main(args) == 0 and f"({0} added" in capsys.readouterr().out  # warm: nothing new
    done = fill_cache([data], data, tmp_path / "cache", min_pixels=28 * 28, max_pixels=28 * 28, num_workers=0)
    assert done["added"] == n_images  # other bounds: other entries
    explicit = fill_cache([data], data, tmp_path / "cache", min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 16384)
    assert explicit["added"] == 0  # the defaults written out are the same entries as no bounds
    save_tiny_processor(tmp_path / "processor", min_pixels=28 * 28, max_pixels=28 * 28)
    assert main(args + ["--processor", str(tmp_path / "processor")]) == 0
    assert "(0 added" in capsys.readouterr().out  # the processor's bounds: the entries filled above
    assert main(["data", "cache", str(tmp_path / "nothing"), "--image-root", str(data)]) == 2
    assert "neither a VHs JSON file nor a folder" in capsys.readouterr().err
