"""The engine's bag reader (``federation.data.bags``) against the format owner, ``wsi.bag``.

Bags are written by the real tiler (``preprocessing.tile``) from a small synthetic slide, in
both encodings, and by ``slide_bags.write_bag`` for version 1 and for broken bags. Scoring's
reader threads (``federation.evaluation.scoring.model_batches``) are tested here too.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import imagecodecs
import numpy as np
import pytest
import torch
from slide_bags import synthetic_patches, write_bag
from torch.utils.data import DataLoader, Dataset

from federation.data.bags import BagFormatError, BagReader, index_bag
from federation.data.patches import to_model_input
from federation.evaluation.scoring import model_batches
from preprocessing.tile import TilingOptions, tile_slide
from wsi.bag import PatchEncoding, read_patches
from wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

ENCODINGS = ("jpeg", "deflate")


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> dict[str, Path]:
    """A 2048-px synthetic slide tiled at 1 µm/px into 32-px patches, once per encoding."""
    out = tmp_path_factory.mktemp("tiled")
    slide = write_synthetic_slide(out / "s.tiff", SyntheticSlideSpec(
        width=2048, height=2048, tumour_regions=1, seed=3, level_downsample=2,
        smallest_level_px=512))
    return {encoding: tile_slide(slide.path, out / f"{encoding}.h5",
                                 TilingOptions(target_mpp=1.0, patch_size=32,
                                               encoding=PatchEncoding(encoding)),
                                 slide_label=1, progress=False).bag_path
            for encoding in ENCODINGS}


def _reference(path: Path, indices: list[int]) -> torch.Tensor:
    """``wsi.bag.read_patches`` as the engine's layout, uint8 (k, 3, P, P)."""
    with h5py.File(path, "r") as f:
        return torch.from_numpy(read_patches(f, indices)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_reader_gives_the_format_owners_pixels_in_any_order(tiled, encoding) -> None:
    path = tiled[encoding]
    n = index_bag(path, 1).n_patches
    assert n > 20
    indices = [7, 0, n - 1, 7, 3, 3, 0, n // 2]  # unsorted, with repeats
    patches = BagReader().read(path, np.array(indices))
    assert patches.dtype == torch.uint8 and patches.shape == (len(indices), 3, 32, 32)
    assert torch.equal(patches, _reference(path, indices))
    assert torch.equal(patches[0], patches[3]) and not torch.equal(patches[0], patches[1])
    assert BagReader().read(path, np.array([], np.int64)).shape == (0, 3, 32, 32)


def test_index_of_a_tiled_bag_has_its_settings_and_weak_labels(tiled) -> None:
    bag = index_bag(tiled["jpeg"], 1)
    assert (bag.patch_size, bag.target_mpp, bag.label, bag.label_source) == (32, 1.0, 1, "slide")
    assert bag.patch_labels.shape == (bag.n_patches,) and (bag.patch_labels == 1).all()


def test_version_1_bags_are_read(tmp_path) -> None:
    pixels = synthetic_patches(np.random.default_rng(0), np.array([True, False, True]), 32)
    path = write_bag(tmp_path / "v1.h5", "v1", pixels, version=1)
    bag = index_bag(path, 0)
    assert bag.label_source == "slide" and bag.patch_labels.tolist() == [0, 0, 0]
    assert torch.equal(BagReader().read(path, np.array([2, 0])), _reference(path, [2, 0]))


def _flip_stored_bytes(path: Path, stored: bytes) -> None:
    """Invert a run of bytes in the middle of ``stored`` where it lies in the file."""
    raw = bytearray(path.read_bytes())
    start = raw.find(stored)
    assert start >= 0 and raw.find(stored, start + 1) < 0  # found, once
    middle = start + len(stored) // 2
    raw[middle:middle + 4] = bytes(b ^ 0xFF for b in raw[middle:middle + 4])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_damaged_patch_is_an_error_naming_file_and_patch(tiled, tmp_path, encoding) -> None:
    path = shutil.copy(tiled[encoding], tmp_path / "damaged.h5")
    with h5py.File(path, "r") as f:
        patches = f["patches"]
        stored = (patches.id.read_direct_chunk((5, 0, 0, 0))[1] if encoding == "deflate"
                  else patches[5].tobytes())
    _flip_stored_bytes(path, stored)
    reader = BagReader()
    with pytest.raises(BagFormatError) as error:
        reader.read(path, np.array([4, 5]))
    assert str(error.value) == f"{path}: patch 5 is corrupt (checksum mismatch)"
    assert torch.equal(reader.read(path, np.array([4, 6])), _reference(tiled[encoding], [4, 6]))


def _small_bags(directory: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(1)
    return [write_bag(directory / f"b{i}.h5", f"b{i}",
                      synthetic_patches(rng, np.zeros(4, bool), 32)) for i in range(count)]


def test_reader_keeps_at_most_max_open_files(tmp_path) -> None:
    paths = _small_bags(tmp_path, 5)
    reader = BagReader(max_open=2)
    first = [reader.read(p, np.array([1, 3])) for p in paths]
    assert reader.open_files == 2
    for path, expected in zip(paths[::-1] + paths, first[::-1] + first, strict=True):
        assert torch.equal(reader.read(path, np.array([1, 3])), expected)
        assert reader.open_files <= 2
    reader.close()
    assert reader.open_files == 0
    with pytest.raises(ValueError, match="max_open"):
        BagReader(max_open=0)


class _PatchRows(Dataset):
    """Patch ``i`` of every bag, read by the reader it was given (in a forked worker)."""

    def __init__(self, reader: BagReader, paths: list[Path]) -> None:
        self.reader, self.paths = reader, paths

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([self.reader.read(p, np.array([i]))[0] for p in self.paths])


def test_reader_works_in_forked_dataloader_workers(tmp_path) -> None:
    paths = _small_bags(tmp_path, 3)
    reader = BagReader(max_open=2)
    expected = torch.stack([_PatchRows(reader, paths)[i] for i in range(4)])  # handles opened
    loader = DataLoader(_PatchRows(reader, paths), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    assert torch.equal(torch.stack(list(loader)), expected)
    assert reader.open_files == 2  # the parent's handles are untouched and still usable
    assert torch.equal(reader.read(paths[0], np.array([2])), expected[2, :1])


# ---------------------------------------------------------------------------- index errors


def _set_attr(name: str, value):
    def change(f: h5py.File) -> None:
        f.attrs[name] = value
    return change


def _delete(name: str, dataset: str | None = None):
    def change(f: h5py.File) -> None:
        del (f[dataset] if dataset else f).attrs[name]
    return change


def _delete_dataset(name: str):
    def change(f: h5py.File) -> None:
        del f[name]
    return change


@pytest.mark.parametrize("change, reason", [
    (_set_attr("format_version", 3),
     "bag format version 3 is not one of [1, 2]; re-run preprocessing"),
    (_set_attr("format", "clam"), "not a slidefed bag (format 'clam')"),
    (_delete("slide_id"), "missing root attribute 'slide_id'"),
    (_delete("target_mpp"), "missing root attribute 'target_mpp'"),
    (_delete("patch_size", "patches"), "patches lack attribute 'patch_size'"),
    (_delete("encoding", "patches"), "patch encoding None is not one of ['jpeg', 'deflate']"),
    (_delete_dataset("coords"), "missing dataset 'coords'"),
    (_delete("threshold", "labels"),
     "annotation labels lack attribute 'threshold'"),
])
def test_index_errors_are_one_line_naming_the_bag(tmp_path, change, reason) -> None:
    pixels = synthetic_patches(np.random.default_rng(0), np.zeros(3, bool), 32)
    path = write_bag(tmp_path / "bad.h5", "bad", pixels, tumour_fraction=np.zeros(3))
    with h5py.File(path, "a") as f:
        change(f)
    with pytest.raises(BagFormatError) as error:
        index_bag(path, 0)
    assert str(error.value) == f"{path}: {reason}"


def test_empty_missing_and_foreign_bags_are_errors_naming_the_file(tmp_path) -> None:
    empty = write_bag(tmp_path / "empty.h5", "empty", np.zeros((0, 32, 32, 3), np.uint8))
    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"not hdf5 at all")
    for path, reason in ((empty, "bag holds no patches"), (tmp_path / "gone.h5", "bag not found"),
                         (foreign, "unreadable bag")):
        with pytest.raises(BagFormatError) as error:
            index_bag(path, 1)
        assert str(error.value).startswith(f"{path}: {reason}")
        assert "\n" not in str(error.value)


def test_tumour_annotated_on_a_normal_slide_is_refused(tmp_path) -> None:
    tumour = np.array([False, True, False])
    pixels = synthetic_patches(np.random.default_rng(0), tumour, 32)
    path = write_bag(tmp_path / "t.h5", "t", pixels, tumour_fraction=tumour.astype(float))
    assert index_bag(path, 1).patch_labels.tolist() == [0, 1, 0]
    with pytest.raises(BagFormatError) as error:
        index_bag(path, 0)
    assert str(error.value) == (f"{path}: slide label is 0 but its annotations mark tumour "
                                "patches")


def test_a_damaged_checksums_chunk_is_an_error_naming_the_bag(tiled, tmp_path) -> None:
    path = shutil.copy(tiled["jpeg"], tmp_path / "damaged.h5")
    with h5py.File(path, "r") as f:  # Fletcher-32 guards the checksums themselves
        chunk = f["checksums"].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[chunk.byte_offset + 8] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BagFormatError) as error:
        BagReader().read(path, np.array([1]))
    assert str(error.value).startswith(f"{path}: checksums are damaged (")
    assert "\n" not in str(error.value)


def test_an_undecodable_patch_of_a_version_1_bag_is_an_error_naming_it(tmp_path) -> None:
    pixels = synthetic_patches(np.random.default_rng(0), np.zeros(3, bool), 32)
    path = write_bag(tmp_path / "v1.h5", "v1", pixels, version=1)  # no checksums to catch it
    with h5py.File(path, "a") as f:
        f["patches"][1] = np.frombuffer(b"not a jpeg", np.uint8)
    with pytest.raises(BagFormatError) as error:
        BagReader().read(path, np.array([2, 1, 0]))
    assert str(error.value).startswith(f"{path}: patch 1 does not decode (")
    assert "\n" not in str(error.value)


def test_a_patch_of_the_wrong_size_in_a_version_1_bag_is_an_error_naming_it(tmp_path) -> None:
    pixels = synthetic_patches(np.random.default_rng(0), np.zeros(3, bool), 32)
    path = write_bag(tmp_path / "v1.h5", "v1", pixels, version=1)
    with h5py.File(path, "a") as f:  # a valid JPEG, but 16 px where the bag says 32
        f["patches"][2] = np.frombuffer(imagecodecs.jpeg8_encode(pixels[2, :16, :16]), np.uint8)
    with pytest.raises(BagFormatError) as error:
        BagReader().read(path, np.array([0, 2]))
    assert str(error.value).startswith(f"{path}: patch 2 is not 32x32 RGB (")


def test_patches_read_in_order_and_reordered_are_the_same_pixels(tiled) -> None:
    reader = BagReader()
    in_order = reader.read(tiled["jpeg"], np.arange(4))
    shuffled = reader.read(tiled["jpeg"], np.array([3, 1, 1, 0, 2]))
    assert torch.equal(shuffled, in_order[[3, 1, 1, 0, 2]])


# ---------------------------------------------------------------------------- reader threads


def test_reader_threads_give_scoring_the_same_batches_in_order(tiled) -> None:
    bag = index_bag(tiled["jpeg"], None)
    indices = np.random.default_rng(0).permutation(bag.n_patches)[:17]
    expected = [to_model_input(_reference(tiled["jpeg"], indices[s:s + 3].tolist()))
                for s in range(0, 17, 3)]
    for threads in (1, 2, 4, 8):  # 8: more threads than the 6 batches
        got = list(model_batches(BagReader(threads=threads), bag, indices, 3))
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert list(model_batches(BagReader(threads=2), bag, indices[:0], 3)) == []


def test_a_damaged_patch_read_by_a_reader_thread_is_the_error_naming_it(tiled, tmp_path) -> None:
    path = shutil.copy(tiled["jpeg"], tmp_path / "damaged.h5")
    with h5py.File(path, "r") as f:
        stored = f["patches"][10].tobytes()
    _flip_stored_bytes(path, stored)
    batches = model_batches(BagReader(threads=3), index_bag(path, None), np.arange(12), 2)
    assert len([next(batches) for _ in range(5)]) == 5  # patches 0-9 are whole
    with pytest.raises(BagFormatError, match=r"damaged\.h5: patch 10 is corrupt"):
        next(batches)


def test_reader_threads_survive_pickling_and_must_be_positive() -> None:
    assert pickle.loads(pickle.dumps(BagReader(max_open=3, threads=4))).threads == 4
    with pytest.raises(ValueError, match="threads must be at least 1"):
        BagReader(threads=0)
