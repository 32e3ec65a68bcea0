"""The patch-bag format: writing, atomicity, validation, and reading with h5py alone."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi.bag import (
    ROOT_ATTRIBUTES,
    BagAttributes,
    BagError,
    BagWriter,
    PatchEncoding,
    PatchGeometry,
    check_bag,
    read_patches,
)

ATTRS = BagAttributes(slide_id="s1", source_path="/slides/s1.svs", mpp_level0=0.25,
                      target_mpp=0.5, read_level=1, level0_width=4096, level0_height=2048,
                      vendor="generic-tiff")
GEOMETRY = PatchGeometry(patch_size=32, read_size=32, step_level0=64)
DEFLATE = PatchEncoding("deflate")


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write(path, n=5, seed=0, encoding=DEFLATE):
    patches = _patches(n, seed)
    coords = np.stack([np.arange(n) * 64, np.zeros(n, int)], 1)
    with BagWriter(path, ATTRS, GEOMETRY, coords, np.linspace(0.5, 1, n), encoding) as writer:
        writer.write_chunks(0, [encoding.encode(p) for p in patches[:1]])  # a one-patch block
        writer.write_chunks(1, [encoding.encode(p) for p in patches[1:]])
    return patches, coords


@pytest.mark.parametrize("name", ["jpeg", "deflate"])
def test_every_encoding_writes_single_and_multi_patch_blocks(tmp_path, name):
    _write(tmp_path / "s.h5", encoding=PatchEncoding(name))
    assert check_bag(tmp_path / "s.h5", deep=True) == 5


def test_jpeg_batches_of_equal_length_are_stored_as_they_are(tmp_path):
    path, encoding = tmp_path / "s.h5", PatchEncoding("jpeg")
    same = encoding.encode(_patches(1)[0])
    coords = np.stack([np.arange(3) * 64, np.zeros(3, int)], 1)
    with BagWriter(path, ATTRS, GEOMETRY, coords, np.ones(3), encoding) as writer:
        writer.write_chunks(0, [same, same, same])
    with h5py.File(path, "r") as f:
        assert [bytes(f["patches"][i]) for i in range(3)] == [same] * 3


def test_bag_round_trips_through_plain_h5py(tmp_path):
    path = tmp_path / "s1.h5"
    patches, coords = _write(path)
    assert check_bag(path, deep=True) == 5
    with h5py.File(path, "r") as f:  # no slidefed code on the reading side
        np.testing.assert_array_equal(f["patches"][()], patches)
        np.testing.assert_array_equal(read_patches(f, [3, 1]), patches[[3, 1]])
        np.testing.assert_array_equal(f["coords"][()], coords)
        assert f["coords"].attrs["patch_level"] == 1 and f["coords"].attrs["patch_size"] == 32
        assert f["patches"].chunks == (1, 32, 32, 3)
        assert f["patches"].compression == "gzip"
        assert set(ROOT_ATTRIBUTES) <= set(f.attrs)
        assert f.attrs["format"] == "slidefed-bag" and f.attrs["format_version"] == 1
        assert f["tissue_fraction"].dtype == np.float32


def test_jpeg_bag_decodes_close_to_the_original(tmp_path):
    path = tmp_path / "s1.h5"
    smooth = np.kron(_patches(3)[:, :2, :2], np.ones((1, 16, 16, 1), np.uint8))  # JPEG-friendly
    coords = np.stack([np.arange(3) * 64, np.zeros(3, int)], 1)
    encoding = PatchEncoding("jpeg", 95)
    with BagWriter(path, ATTRS, GEOMETRY, coords, np.ones(3), encoding) as writer:
        writer.write_chunks(0, [encoding.encode(p) for p in smooth])
    assert check_bag(path, deep=True) == 3
    with h5py.File(path, "r") as f:
        assert f["patches"].attrs["encoding"] == "jpeg"
        assert f["patches"].attrs["encoding_level"] == 95
        decoded = read_patches(f, [2, 0])
        raw = bytes(f["patches"][1])
    assert raw[:2] == b"\xff\xd8"  # each element is a plain JPEG file
    assert decoded.shape == (2, 32, 32, 3)
    assert np.abs(decoded.astype(float) - smooth[[2, 0]]).mean() < 6


@pytest.mark.parametrize("name, level", [("jpeg", 0), ("jpeg", 100), ("deflate", 10), ("png", 1)])
def test_encoding_levels_are_checked(name, level):
    with pytest.raises(ValueError, match=name):
        PatchEncoding(name, level)


def test_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "s1.h5"
    coords = np.zeros((3, 2), int)
    with pytest.raises(RuntimeError), BagWriter(path, ATTRS, GEOMETRY, coords, np.ones(3),
                                                DEFLATE) as w:
        w.write_chunks(0, [DEFLATE.encode(_patches(1)[0])])
        raise RuntimeError("reader crashed")
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_an_incomplete_bag(tmp_path):
    path = tmp_path / "s1.h5"
    writer = BagWriter(path, ATTRS, GEOMETRY, np.zeros((3, 2), int), np.ones(3), DEFLATE)
    writer.write_chunks(0, [DEFLATE.encode(_patches(1)[0])])
    with pytest.raises(BagError, match="2 patches were never written"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_validation_names_the_problem(tmp_path):
    path = tmp_path / "s1.h5"
    _write(path)
    with h5py.File(path, "a") as f:
        del f.attrs["mpp_level0"]
    with pytest.raises(BagError, match=r"missing root attributes \['mpp_level0'\]"):
        check_bag(path)

    _write(path)
    with h5py.File(path, "a") as f:
        f["coords"][0] = (999_999, 0)
    with pytest.raises(BagError, match="outside the slide"):
        check_bag(path)

    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(BagError, match="not an HDF5 file"):
        check_bag(text)
    with pytest.raises(BagError, match="bag not found"):
        check_bag(tmp_path / "missing.h5")


def test_truncated_bag_fails_validation(tmp_path):
    path = tmp_path / "s1.h5"
    _write(path, n=20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BagError):
        check_bag(path)
