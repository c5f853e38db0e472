"""A stand-in TFDS ``oxford_iiit_pet``: the real builder's name, version and features (it subclasses it), a few
dozen generated JPEGs instead of the 800 MB download. Split ``train`` and ``test`` like the real set."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

with tfds.core.registered.skip_registration():
    from tensorflow_datasets.datasets.oxford_iiit_pet import oxford_iiit_pet_dataset_builder as _real

    class StandInPets(_real.Builder):
        name = "oxford_iiit_pet"  # the real one's (a subclass would otherwise be named after its class)
        pkg_dir_path = epath.Path(_real.__file__).parent  # the real one's metadata (description, citation)
        per_breed = 10
        breeds = ("Abyssinian", "Bengal", "beagle", "boxer")  # 2 cat breeds (upper case), 2 dog breeds

        def _split_generators(self, dl_manager):
            files = [f"{b}_{i}.jpg" for b in self.breeds for i in range(1, self.per_breed + 1)]
            return {"train": self._generate_examples(files[0::2]), "test": self._generate_examples(files[1::2])}

        def _generate_examples(self, files):
            for k, name in enumerate(files):
                breed = name.rsplit("_", 1)[0]
                rng = np.random.default_rng(zlib.crc32(name.encode()))
                arr = rng.integers(0, 256, (40, 48, 3), np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG")
                buf.seek(0)
                yield name, {
                    "image": buf,
                    "label": _real._LABEL_CLASSES.index(breed),
                    "species": 0 if breed[0].isupper() else 1,
                    "file_name": name,
                    "segmentation_mask": np.ones((40, 48, 1), np.uint8) * (k % 3 + 1),
                    "head_bbox": _real._EMPTY_BBOX,
                }


def write_standin_pets(data_dir: str | Path) -> Path:
    """Prepare the stand-in under ``data_dir`` (as ``tfds build oxford_iiit_pet`` would); returns data_dir."""
    StandInPets(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return Path(data_dir)


def standin_files() -> dict[str, list[str]]:
    files = [f"{b}_{i}.jpg" for b in StandInPets.breeds for i in range(1, StandInPets.per_breed + 1)]
    return {"train": files[0::2], "test": files[1::2]}
