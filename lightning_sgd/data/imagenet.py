"""ImageNet (ILSVRC-2012) in the usual folder layout, decoded with Pillow (no torchvision).

Layout: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG`` (the validation images sorted into one
folder per class, e.g. with the ``valprep.sh`` script). Class ids are the sorted ``wnid`` folder names of ``train``.
Training crops follow He et al. / Goyal et al.: a random crop of 8%-100% of the area and aspect ratio 3/4-4/3,
resized to ``image_size``, flipped with probability 1/2; evaluation resizes the short side to
``image_size * 256 / 224`` and takes the central ``image_size`` crop. Images come out as uint8 ``(3, S, S)``
tensors; the DataModule normalizes them on the device.

Listing refuses a validation class folder that the training split does not have (its images would be dropped) and
more class folders than the model has classes; an image that cannot be decoded raises
:class:`~lightning_sgd.data.errors.DataFileError` naming it when the loader reaches it (decoding 1.28M images up
front would take longer than an epoch).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from lightning_sgd._extras import require
from lightning_sgd.data.errors import bad_file, redownload

Image = require("PIL.Image", "the ImageNet folder reader (lightning_sgd.data.imagenet)")

EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".webp")
SOURCE = "https://image-net.org/download-images.php (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar)"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_FORMAT = f"an image Pillow decodes ({', '.join(EXTENSIONS)})"
LAYOUT = "<root>/{train,val}/<wnid>/*.JPEG, the validation images sorted into the training split's class folders"


def list_image_folder(root: str | Path, split: str, classes: list[str] | None = None,
                      num_classes: int | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """``(path, class id)`` for every image under ``root/split/<class>/`` and the class names.

    ``classes`` (the training split's, when listing ``val``) fixes the ids; a class folder outside it is refused,
    as is a split with more than ``num_classes`` class folders (the model's output count), since either would
    give labels the model cannot score.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet: expected the folder layout {Path(root) / 'train'}/<wnid>/*.JPEG and {Path(root) / 'val'}"
            f"/<wnid>/*.JPEG; {folder} does not exist. Download {SOURCE}, unpack both tars into that layout and "
            "pass --data.init_args.root=<that folder>."
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    known = set(classes)
    unknown = [name for name in found if name not in known]
    if unknown:
        raise bad_file(folder, f"has class folders the training split lacks: {', '.join(unknown[:5])}"
                       + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""), LAYOUT,
                       f"Sort the {split} images into the training class folders (e.g. with valprep.sh) or remove "
                       "the stray folders.")
    if num_classes is not None and len(classes) > num_classes:
        raise bad_file(folder, f"has {len(classes)} class folders, so labels reach {len(classes) - 1}",
                       f"at most num_classes={num_classes} class folders",
                       "Remove the extra folders or raise num_classes to match.")
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        (p, index[d.name])
        for d in sorted(folder.iterdir()) if d.is_dir() and d.name in index
        for p in sorted(d.iterdir()) if p.suffix.lower() in EXTENSIONS
    ]
    if not samples:
        raise FileNotFoundError(f"ImageNet: no images ({', '.join(EXTENSIONS)}) under {folder}/<class>/.")
    return samples, classes


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def random_resized_crop(image: Image.Image, size: int, rng: random.Random,
                        scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> Image.Image:
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    side = min(width, height)  # fall back to the central square
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short = max(size, round(size * 256 / 224))
    scale = short / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Decoded, cropped uint8 images ``(3, S, S)`` and int64 labels from :func:`list_image_folder`."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, train: bool, seed: int = 0) -> None:
        self.samples, self.image_size, self.train, self.seed = samples, image_size, train, seed
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # truncated, corrupt, foreign
            raise bad_file(path, f"cannot be decoded ({type(err).__name__}: {err})", IMAGE_FORMAT,
                           redownload(SOURCE)) from err
        if self.train:
            image = random_resized_crop(image, self.image_size, self._rng)
            if self._rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = center_crop(image, self.image_size)
        return _to_tensor(image), torch.tensor(label, dtype=torch.int64)


def worker_init_fn(worker_id: int) -> None:
    """Give every DataLoader worker its own augmentation stream."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, ImageFolderDataset):
        info.dataset._rng = random.Random(info.seed)
