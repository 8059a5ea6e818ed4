"""How far the JPEG copy's pixels are from the official ones, on the only official images reachable here.

The foolbox wheel on PyPI ships the first 20 official CIFAR-10 test images as lossless PNGs
(foolbox/data/cifar10_<index>_<label>.png); cifar10-jpg keeps each class's test images in official order
(test/<class>/<NNNN>.jpg = that class's NNNN-th image). Usage, from the repository root:

    pip download --no-deps foolbox==3.3.4 -d /tmp/foolbox
    python scripts/jpeg_distance.py /tmp/foolbox/foolbox-3.3.4-py3-none-any.whl ../shared/data/cifar10-jpg.tar.gz
"""

from __future__ import annotations

import io
import re
import sys
import tarfile
import zipfile

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def pixels(data: bytes) -> np.ndarray:
    """An image file's RGB pixels as float (0-255)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def main(wheel: str, archive: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        pngs = sorted(n for n in zf.namelist() if re.search(r"data/cifar10_\d+_\d+\.png$", n))
        official = [(int(re.findall(r"_(\d+)\.png$", n)[0]), pixels(zf.read(n))) for n in pngs]
    seen = dict.fromkeys(range(len(CLASSES)), 0)  # the k-th test image of a class so far (official order)
    wanted = {}
    for label, _ in official:
        wanted[f"test/{CLASSES[label]}/{seen[label]:04d}.jpg"] = len(wanted)
        seen[label] += 1
    copies: dict[int, np.ndarray] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            key = next((k for k in wanted if member.name.endswith(k)), None)
            if key is not None:
                copies[wanted[key]] = pixels(tar.extractfile(member).read())
    diff = np.stack([a for _, a in official]) - np.stack([copies[i] for i in range(len(official))])
    mse = float((diff**2).mean())
    print(
        f"{len(official)} official test images vs cifar10-jpg: mean |difference| {np.abs(diff).mean():.2f} of 255, "
        f"RMSE {mse**0.5:.2f}, PSNR {10 * np.log10(255**2 / mse):.1f} dB, pixel values unchanged "
        f"{100 * float((diff == 0).mean()):.1f} %, largest difference {np.abs(diff).max():.0f}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
