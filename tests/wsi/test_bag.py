"""The patch-bag format: writing, atomicity, validation, and reading with h5py alone."""

from __future__ import annotations

import io
import zlib
from dataclasses import asdict

import h5py
import numpy as np
import pytest
from PIL import Image

from wsi.bag import (
    ROOT_ATTRIBUTES,
    BagAttributes,
    BagError,
    BagWriter,
    PatchEncoding,
    PatchGeometry,
    PatchLabels,
    bag_version,
    check_bag,
    checksum,
    read_labels,
    read_patches,
)

ATTRS = BagAttributes(slide_id="s1", source_path="/slides/s1.svs", mpp_level0=0.25,
                      mpp_source="file", target_mpp=0.5, read_level=1, level0_width=4096,
                      level0_height=2048, vendor="generic-tiff")
GEOMETRY = PatchGeometry(patch_size=32, read_size=32, step_level0=64)
DEFLATE = PatchEncoding("deflate")


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _encoded(patches, encoding):
    chunks = [encoding.encode(p) for p in patches]
    return chunks, [checksum(c) for c in chunks]


def _write(path, n=5, seed=0, encoding=DEFLATE, labels=None):
    patches = _patches(n, seed)
    coords = np.stack([np.arange(n) * 64, np.zeros(n, int)], 1)
    with BagWriter(path, ATTRS, GEOMETRY, coords, np.linspace(0.5, 1, n), encoding,
                   labels) as writer:
        writer.write_chunks(0, *_encoded(patches[:1], encoding))  # a one-patch block
        writer.write_chunks(1, *_encoded(patches[1:], encoding))
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
        writer.write_chunks(0, [same] * 3, [checksum(same)] * 3)
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
        assert f.attrs["format"] == "slidefed-bag" and f.attrs["format_version"] == 2
        assert f.attrs["mpp_source"] == "file"
        assert f["tissue_fraction"].dtype == np.float32


def test_jpeg_bag_decodes_close_to_the_original(tmp_path):
    path = tmp_path / "s1.h5"
    smooth = np.kron(_patches(3)[:, :2, :2], np.ones((1, 16, 16, 1), np.uint8))  # JPEG-friendly
    coords = np.stack([np.arange(3) * 64, np.zeros(3, int)], 1)
    encoding = PatchEncoding("jpeg", 95)
    with BagWriter(path, ATTRS, GEOMETRY, coords, np.ones(3), encoding) as writer:
        writer.write_chunks(0, *_encoded(smooth, encoding))
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
        w.write_chunks(0, *_encoded(_patches(1), DEFLATE))
        raise RuntimeError("reader crashed")
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_an_incomplete_bag(tmp_path):
    path = tmp_path / "s1.h5"
    writer = BagWriter(path, ATTRS, GEOMETRY, np.zeros((3, 2), int), np.ones(3), DEFLATE)
    writer.write_chunks(0, *_encoded(_patches(1), DEFLATE))
    with pytest.raises(BagError, match="2 patches were never written"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_deletes_the_temporary_file(tmp_path):
    # A directory appears at the bag's name while it is written: the rename fails, and the
    # hidden temporary used to stay behind.
    path = tmp_path / "s1.h5"
    writer = BagWriter(path, ATTRS, GEOMETRY, np.zeros((1, 2), int), np.ones(1), DEFLATE)
    writer.write_chunks(0, *_encoded(_patches(1), DEFLATE))
    path.mkdir()
    with pytest.raises(IsADirectoryError):
        writer.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]


def test_a_directory_is_not_a_bag_to_write(tmp_path):
    with pytest.raises(BagError, match="is a directory, not a bag file"):
        BagWriter(tmp_path, ATTRS, GEOMETRY, np.zeros((1, 2), int), np.ones(1), DEFLATE)
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


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _stored_offset(path, i):
    """File offset of the middle of patch i's stored bytes, found as h5py stores them."""
    with h5py.File(path, "r") as f:
        ds = f["patches"]
        if ds.attrs["encoding"] == "deflate":
            info = ds.id.get_chunk_info(i)
            return info.byte_offset + info.size // 2
        stored = bytes(ds[i])
    # A vlen element lives in HDF5's global heap: search the file for the JPEG itself.
    offset = path.read_bytes().find(stored)
    assert offset > 0
    return offset + len(stored) // 2


@pytest.mark.parametrize("name", ["jpeg", "deflate"])
def test_a_flipped_byte_in_a_patch_is_reported_by_name(tmp_path, name):
    path = tmp_path / "s1.h5"
    patches, _ = _write(path, n=5, encoding=PatchEncoding(name))
    with h5py.File(path, "r") as f:
        original = bytes(f["patches"][2]) if name == "jpeg" else None
    _flip_byte(path, _stored_offset(path, 2))
    if name == "jpeg":  # libjpeg would have decoded it without complaint
        with h5py.File(path, "r") as f:
            damaged = bytes(f["patches"][2])
        assert damaged != original
        assert np.asarray(Image.open(io.BytesIO(damaged)).convert("RGB")).shape == (32, 32, 3)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(read_patches(f, [0, 4]), read_patches(f, [0, 4]))
        with pytest.raises(BagError) as err:
            read_patches(f, [1, 2])
    assert str(err.value) == f"{path}: patch 2 is corrupt (checksum mismatch)"
    assert check_bag(path) == 5  # the shallow check reads only the last patch
    with pytest.raises(BagError, match="patch 2 is corrupt"):
        check_bag(path, deep=True)


def test_flipped_label_bytes_fail_hdf5s_fletcher32_check(tmp_path):
    path = tmp_path / "s1.h5"
    _write(path, labels=PatchLabels(np.array([0, 0.25, 0.5, 0.75, 1]), "annotation", 0.5))
    with h5py.File(path, "r") as f:
        info = f["labels"].id.get_chunk_info(0)
    _flip_byte(path, info.byte_offset + 5)
    with pytest.raises(BagError, match=rf"^{path}: labels is damaged \(") as err:
        check_bag(path)
    assert "\n" not in str(err.value)


def test_version_2_items(tmp_path):
    path = tmp_path / "s1.h5"
    labels = PatchLabels(np.array([0, 0.25, 0.5, 0.75, 1]), "annotation", 0.5)
    _write(path, encoding=PatchEncoding("jpeg"), labels=labels)
    with h5py.File(path, "r") as f:
        sums = f["checksums"]
        assert sums.dtype == np.uint32 and sums.shape == (5,)
        assert sums.attrs["algorithm"] == "crc32"
        assert [int(s) for s in sums] == [zlib.crc32(bytes(f["patches"][i])) for i in range(5)]
        assert f["labels"].dtype == np.float32
        assert dict(f["labels"].attrs) == {"source": "annotation", "threshold": 0.5}
        for name in ("coords", "tissue_fraction", "labels", "checksums"):
            assert f[name].fletcher32, name
        read = read_labels(f)
    np.testing.assert_array_equal(read.values, labels.values)
    assert read.tumour.tolist() == [False, False, True, True, True]


def _downgrade_to_version_1(path):
    """What a version-1 writer produced: no checksums, labels or mpp_source."""
    with h5py.File(path, "a") as f:
        for name in ("checksums", "labels"):
            del f[name]
        del f.attrs["mpp_source"]
        f.attrs["format_version"] = 1


@pytest.mark.parametrize("name", ["jpeg", "deflate"])
def test_version_1_bags_are_still_read(tmp_path, name):
    path = tmp_path / "s1.h5"
    patches, _ = _write(path, encoding=PatchEncoding(name),
                        labels=PatchLabels(np.ones(5), "slide", 0.5))
    _downgrade_to_version_1(path)
    assert check_bag(path, deep=True) == 5
    with h5py.File(path, "r") as f:
        assert bag_version(f) == 1 and read_labels(f) is None
        decoded = read_patches(f, [4, 0])
    if name == "deflate":
        np.testing.assert_array_equal(decoded, patches[[4, 0]])


def test_version_2_requires_its_items_and_unknown_versions_are_refused(tmp_path):
    path = tmp_path / "s1.h5"
    _write(path)
    with h5py.File(path, "a") as f:
        del f["checksums"]
    with pytest.raises(BagError, match="missing dataset 'checksums'"):
        check_bag(path)
    _write(path)
    with h5py.File(path, "a") as f:
        del f.attrs["mpp_source"]
    with pytest.raises(BagError, match=r"missing root attributes \['mpp_source'\]"):
        check_bag(path)
    _write(path)
    with h5py.File(path, "a") as f:
        f.attrs["mpp_source"] = "user"  # the retired --slide-mpp: still read
    assert check_bag(path) == 5
    with h5py.File(path, "a") as f:
        f.attrs["mpp_source"] = "guess"
    with pytest.raises(BagError, match="mpp_source 'guess' is not one of"):
        check_bag(path)
    with pytest.raises(ValueError, match="mpp source must be one of"):
        BagAttributes(**{**asdict(ATTRS), "mpp_source": "user"})
    _write(path)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(BagError) as err:
        check_bag(path)
    assert str(err.value) == f"{path}: format version 3 is not one this slidefed reads (1, 2)"
    with h5py.File(path, "r") as f, pytest.raises(BagError, match="format version 3"):
        read_patches(f, [0])


@pytest.mark.parametrize("source, values, threshold, problem", [
    ("slide", [0, 0.5, 1, 1, 1], 0.5, "slide labels must be 0 or 1"),
    ("annotation", [0, 1.5, 1, 1, 1], 0.5, r"in \[0, 1\]"),
    ("guess", [0, 1, 1, 1, 1], 0.5, "label source"),
    ("annotation", [0, 1, 1, 1, 1], np.nan, "threshold"),
])
def test_bad_labels_are_refused_when_written_and_when_read(tmp_path, source, values, threshold,
                                                           problem):
    with pytest.raises(ValueError, match=problem):
        PatchLabels(np.array(values), source, threshold)
    path = tmp_path / "s1.h5"
    _write(path)
    with h5py.File(path, "a") as f:
        ds = f.create_dataset("labels", data=np.array(values, np.float32))
        ds.attrs.update({"source": source, "threshold": threshold})
    with pytest.raises(BagError, match=problem):
        check_bag(path)
