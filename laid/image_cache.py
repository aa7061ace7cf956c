"""A disk cache of images decoded and resized to the processor's pixel bounds, shared by training and evaluation.

Reading a COCO JPEG and resizing it (``qwen_vl_utils.fetch_image``) is most of the CPU cost of a Visual Haystacks
prompt; a 150-image prompt repeats it 150 times, for every epoch and every evaluation. :class:`ImageCache` keeps
the result, the exact RGB uint8 pixels ``fetch_image`` returns, as one ``.npy`` file per image and pixel budget:

- key: the file's resolved path, byte size and modification time (ns), the ``min_pixels`` / ``max_pixels`` that
  apply to the image item (:func:`effective_bounds`), and the qwen-vl-utils version (its resize lives there). A changed file or bound is
  a different key, so a hit is never a stale image; old entries are simply not read again.
- writes are atomic: each writer saves to its own temporary file and renames it into place, so several DataLoader
  workers and processes may fill the same cache at once (the last rename wins, with identical bytes).
- size: the resized pixels, height x width x 3 bytes (about 0.9 MB for a COCO image at the default bounds).

The folder: ``image_cache_dir(setting)`` with a setting of ``"auto"`` (``$LAID_CACHE_DIR/images``, default
``~/.cache/laid/images``), ``"none"`` (no cache), or a folder. ``laid data cache`` fills it ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from qwen_vl_utils import fetch_image
from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM, IMAGE_MIN_TOKEN_NUM, SPATIAL_MERGE_SIZE

FORMAT = 1  # bump when what is stored changes


def image_cache_dir(setting: str | None) -> Path | None:
    """The cache folder for a setting: "auto" (the default folder), "none" / None (no cache) or a folder path."""
    if setting is None or setting == "none":
        return None
    if setting == "auto":
        return Path(os.environ.get("LAID_CACHE_DIR") or Path.home() / ".cache" / "laid") / "images"
    return Path(setting)


def effective_bounds(item: dict) -> tuple[int, int]:
    """(min_pixels, max_pixels) that ``fetch_image`` applies to ``item``: its own, else qwen-vl-utils' defaults (so
    an item without bounds and one with the default bounds written out share a cache entry)."""
    patch = 14 * SPATIAL_MERGE_SIZE  # fetch_image's default image_patch_size 14, merged 2 x 2
    return (int(item.get("min_pixels", IMAGE_MIN_TOKEN_NUM * patch ** 2)),
            int(item.get("max_pixels", IMAGE_MAX_TOKEN_NUM * patch ** 2)))


class ImageCache:
    """``load(item)`` returns the pixels of ``fetch_image(item)`` for an image item of ``laid.data.build_messages``
    (a dict with "image": a local path, and optional "min_pixels" / "max_pixels"), from the cache folder when it
    holds it.

    ``folder`` None: no cache, every call decodes and resizes. ``hits`` / ``misses`` count this object's calls.
    """

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = self.misses = 0
        self._salt = json.dumps([FORMAT, version("qwen-vl-utils")])

    def path(self, item: dict) -> Path:
        """The cache file of ``item`` (FileNotFoundError naming the image if it does not exist)."""
        source = Path(item["image"]).resolve()
        try:
            stat = source.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"image {item['image']} not found") from None
        key = json.dumps([str(source), stat.st_size, stat.st_mtime_ns, *effective_bounds(item), self._salt])
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.npy"

    def load(self, item: dict) -> np.ndarray:
        """The decoded, resized RGB pixels of ``item``, uint8 [H, W, 3], exactly as ``qwen_vl_utils.fetch_image``
        gives them (an array, not a PIL image: ``laid.prompt_inputs`` reads the pixels as they are)."""
        if self.folder is None:
            self.misses += 1
            return np.asarray(fetch_image(item), dtype=np.uint8)
        path = self.path(item)
        try:
            pixels = np.load(path, allow_pickle=False)
            self.hits += 1
            return pixels
        except (FileNotFoundError, ValueError, EOFError, OSError):  # absent (or unreadable: written again below)
            pass
        pixels = np.asarray(fetch_image(item), dtype=np.uint8)
        self.misses += 1
        self._write(path, pixels)
        return pixels

    def _write(self, path: Path, pixels: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.save(out, pixels, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _image_paths(data: list[str | Path], image_root: Path) -> list[Path]:
    """Every distinct image of the VHs JSON files in ``data`` (files, or folders of visual_haystack_*.json)."""
    from .data import load_vhs

    files = []
    for item in map(Path, data):
        found = sorted(item.glob("visual_haystack_*.json")) if item.is_dir() else [item]
        if not found or not all(f.is_file() for f in found):
            raise FileNotFoundError(f"data {str(item)!r} is neither a VHs JSON file nor a folder holding some")
        files += found
    names = {p for f in files for entry in load_vhs(f) for p in entry["pos_image"] + entry["neg_image"]}
    return [image_root / name for name in sorted(names)]


class _Fill(torch.utils.data.Dataset):
    """Item k: loads image k through the cache (in a DataLoader worker), returns whether it was added."""

    def __init__(self, paths: list[Path], folder: Path, bounds: dict):
        self.paths, self.folder, self.bounds = paths, folder, bounds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> bool:
        cache = ImageCache(self.folder)
        cache.load({"image": str(self.paths[k]), **self.bounds})
        return cache.misses == 1


def fill_cache(data: list[str | Path], image_root: str | Path, folder: str | Path, *, min_pixels: int | None = None,
               max_pixels: int | None = None, num_workers: int | None = None) -> dict:
    """Put every image of ``data`` into the cache ``folder`` at the given pixel bounds (None: qwen-vl-utils'
    defaults, which are the real processor's: what ``laid eval`` and training use with it); returns
    ``{"images", "added", "bytes"}`` (bytes: their cache files)."""
    from .loading import loader_options

    image_root, folder = Path(image_root), Path(folder)
    paths = _image_paths(list(data), image_root)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images not found under image_root {str(image_root)!r}, e.g. "
                                f"{str(missing[0])!r}")
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    options = loader_options(num_workers, torch.device("cpu"), persistent=False)
    added = sum(torch.utils.data.DataLoader(_Fill(paths, folder, bounds), batch_size=None, **options))
    cache = ImageCache(folder)
    size = sum(cache.path({"image": str(p), **bounds}).stat().st_size for p in paths)
    return {"images": len(paths), "added": int(added), "bytes": size}
