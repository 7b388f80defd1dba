"""One decoder: training data, `ssd predict`, the evaluation report's sample grid and bulk detection's read
tasks see the same pixels for the awkward cases, equal to references computed here without the decoder."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_bulk import _encode, _noise

HEIGHT, WIDTH = 48, 64  # every image below is displayed at this size
PADDING = 6  # visualize.make_grid_image's default


def awkward_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, expected uint8[H, W, 3] RGB), the expectation computed without PIL's decoders
    where the format allows it."""
    rng = np.random.default_rng(0)
    # 16-bit grey: 0..65535 maps onto 0..255 as value / 257 (not value >> 8, which differs e.g. at 33024).
    deep = rng.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    deep[0, :4] = (0, 33024, 32896, 65535)
    deep_expected = np.repeat(np.rint(deep / 257.0).astype(np.uint8)[..., None], 3, axis=2)

    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 64 high x 48 wide.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _encode(Image.fromarray(_noise(WIDTH, HEIGHT, 1)), "JPEG", quality=95, exif=exif.tobytes())
    as_stored = np.asarray(Image.open(io.BytesIO(rotated)).convert("RGB"))  # PIL ignores EXIF unless asked
    rotated_expected = np.ascontiguousarray(np.rot90(as_stored, k=-1))

    # Palette with a transparent entry: the colours as stored, alpha dropped.
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.flatten().tolist())
    palette_png = _encode(paletted, "PNG", transparency=0)

    # CMYK JPEG: converted to RGB by PIL (the decoder's documented meaning).
    cmyk = _encode(Image.fromarray(_noise(HEIGHT, WIDTH, 2, channels=4), "CMYK"), "JPEG", quality=95)
    cmyk_expected = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))

    return {
        "deep.png": (_encode(Image.fromarray(deep), "PNG"), deep_expected),
        "rotated.jpg": (rotated, rotated_expected),
        "palette.png": (palette_png, palette[indices]),
        "cmyk.jpg": (cmyk, cmyk_expected),
    }


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """A COCO-format split holding the awkward images (no boxes needed to read pixels)."""
    root = tmp_path_factory.mktemp("awkward")
    (root / "train").mkdir()
    (root / "annotations").mkdir()
    images = []
    for image_id, (name, (data, _)) in enumerate(awkward_images().items(), start=1):
        (root / "train" / name).write_bytes(data)
        images.append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
    document = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(document))
    return root


def test_every_path_decodes_the_same_pixels(dataset_root):
    from ssd_core import bulk, evaluation
    from ssd_core.bulk.stages import DetectConfig, PreprocessSpec, read_and_preprocess
    from ssd_core.data import CocoDataset
    from ssd_core.predict import read_image

    expected = {name: pixels for name, (_, pixels) in awkward_images().items()}
    names = list(expected)
    folder = dataset_root / "train"

    # Training data: the dataset's items (no transforms: float 0..1) and its raw reader.
    dataset = CocoDataset(dataset_root, "train")
    for index, name in enumerate(names):
        image, _ = dataset[index]
        assert image.dtype == torch.float32
        training = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(training, expected[name], err_msg=f"training: {name}")
        np.testing.assert_array_equal(dataset.read_image(index).permute(1, 2, 0).numpy(), expected[name])

    # `ssd predict`'s reader.
    for name in names:
        np.testing.assert_array_equal(read_image(folder / name), expected[name], err_msg=f"predict: {name}")

    # The evaluation report's sample grid, from the image folder and from the dataset: no results, so the
    # cells are the images themselves (a 2 x 2 grid of equal cells).
    coco_gt = evaluation.load_coco(dataset_root / "annotations" / "instances_train.json")
    for source in ({"images_dir": str(folder)}, {"dataset": dataset}):
        grid = np.asarray(evaluation.render_samples(coco_gt, [], count=len(names), **source))
        for index, name in enumerate(names):
            row, col = divmod(index, 2)
            top, left = PADDING + row * (HEIGHT + PADDING), PADDING + col * (WIDTH + PADDING)
            cell = grid[top : top + HEIGHT, left : left + WIDTH]
            np.testing.assert_array_equal(cell, expected[name], err_msg=f"samples {list(source)}: {name}")

    # Bulk detection's read task, with a preprocessing that keeps 0..255 values at their size.
    listing = bulk.list_images(str(folder))
    config = DetectConfig(output_uri=str(dataset_root / "out"), run_id="r", arch=None, weights=None,
                          model_name="m", weights_digest="d", class_names=[],
                          preprocess_spec=PreprocessSpec((HEIGHT, WIDTH), (0.0, 0.0, 0.0), (1 / 255,) * 3))
    batch = read_and_preprocess(listing, config=config)
    assert batch["status"].tolist() == ["ok"] * len(names)
    for uri, pixels in zip(batch["image_uri"], batch["pixels"]):
        name = uri.rsplit("/", 1)[-1]
        np.testing.assert_array_equal(pixels.transpose(1, 2, 0), expected[name].astype(np.float32),
                                      err_msg=f"bulk: {name}")
