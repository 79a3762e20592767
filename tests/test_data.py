"""training.data: captioned folders (broken images skipped and counted) and the bundled 20-class proxy set."""
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.training import data as D


def _png(path, color, size=(16, 16)):
    Image.new("RGB", size, color).save(path)


def test_folder_with_txt_captions_skips_and_counts_broken_images(tmp_path):
    _png(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "a.txt").write_text("a red square\n")
    _png(tmp_path / "b.jpg", (0, 0, 255))
    (tmp_path / "b.txt").write_text("a blue square")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("never seen")
    _png(tmp_path / "uncaptioned.png", (0, 255, 0))
    ds = D.read_image_folder(tmp_path)
    assert ds.captions == ["a red square", "a blue square"]
    assert ds.images.shape == (2, 16, 16, 3) and ds.images.dtype == np.uint8
    assert tuple(ds.images[0, 0, 0]) == (255, 0, 0)
    # Left out and counted: the broken image and the image without a caption.
    assert sorted(s.split(":")[0] for s in ds.skipped) == ["broken.png", "uncaptioned.png"]


def test_folder_with_metadata_jsonl_and_resize(tmp_path):
    _png(tmp_path / "wide.png", (10, 20, 30), size=(40, 20))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "text": "a wide image"}) + "\n")
    ds = D.read_image_folder(tmp_path, size=8)
    assert ds.captions == ["a wide image"] and ds.images.shape == (1, 8, 8, 3)


def test_folder_errors_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        D.read_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no captioned images found"):
        D.read_image_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: expected"):
        D.read_image_folder(tmp_path)


def test_mixed_sizes_need_a_size(tmp_path):
    for name, size in [("a", (8, 8)), ("b", (16, 16))]:
        _png(tmp_path / f"{name}.png", (0, 0, 0), size)
        (tmp_path / f"{name}.txt").write_text(name)
    with pytest.raises(ValueError, match="differ in size"):
        D.read_image_folder(tmp_path)
    assert D.read_image_folder(tmp_path, size=8).images.shape == (2, 8, 8, 3)


def test_proxy_dataset_splits():
    train, heldout = D.load_proxy_dataset("train"), D.load_proxy_dataset("heldout")
    assert 13300 < len(train) <= 13500 and train.images.shape[1:] == (32, 32, 3) and heldout.images.shape == (1500, 32, 32, 3)
    assert len(train.classes) == 20 and np.bincount(heldout.labels).tolist() == [50] * 10 + [100] * 10
    assert train.captions[0] == "a handwritten digit " + D.DIGIT_NAMES[train.labels[0]]
    assert set(heldout.captions) == set(D.PROXY_CLASSES)
    # No held-out image has a copy in the training split (animal-mnist repeats some silhouettes).
    train_rows = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in train_rows for im in heldout.images)
    # Digits are white on black, centred after padding 28 -> 32.
    assert train.images[:, :2].max() == 0 and train.images.max() == 255


def test_data_pickles_may_only_hold_arrays():
    payload = io.BytesIO()
    pickle.dump(print, payload)
    payload.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="refusing builtins.print"):
        D._ArrayOnlyUnpickler(payload).load()


def test_webdataset_shards_stream_and_skip_broken_samples(tmp_path):
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        return buf.getvalue()

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "000.png", png((255, 0, 0)))
        add(tar, "000.txt", b"red")
        add(tar, "001.jpg", b"not a jpeg")
        add(tar, "001.txt", b"broken")
        add(tar, "002.png", png((0, 255, 0)))
        add(tar, "002.json", json.dumps({"caption": "green"}).encode())
        add(tar, "003.png", png((0, 0, 255)))  # no caption
    ds = D.read_webdataset([shard])
    assert ds.captions == ["red", "green"] and ds.images.shape == (2, 8, 8, 3)
    assert [s.split(":")[0] for s in ds.skipped] == ["001.jpg", "003"]


def test_load_dataset_dispatches_on_the_spec(tmp_path):
    assert len(D.load_dataset("proxy")) > 13000
    _png(tmp_path / "a.png", (1, 2, 3), size=(64, 64))
    (tmp_path / "a.txt").write_text("x")
    assert D.load_dataset(str(tmp_path)).images.shape == (1, 32, 32, 3)
    with pytest.raises(FileNotFoundError, match="no webdataset shards"):
        D.load_dataset(str(tmp_path / "*.tar"))


def test_proxy_spec_is_resized_to_a_teachers_native_size():
    """A teacher whose VAE downsamples by 8 needs 64-pixel images for the 8x8 latents its UNet was sized for."""
    from fewstep.training.data import load_dataset

    small, large = load_dataset("proxy"), load_dataset("proxy", size=64)
    assert small.images.shape[1:] == (32, 32, 3) and large.images.shape[1:] == (64, 64, 3)
    assert large.captions == small.captions
    back = torch.nn.functional.avg_pool2d(torch.as_tensor(large.images[:50]).permute(0, 3, 1, 2).float(), 2)
    assert (back - torch.as_tensor(small.images[:50]).permute(0, 3, 1, 2).float()).abs().mean() < 12
