"""Streams from Python: the same voxels as the Rust client (over messages and over shared
memory), no copy (the arrays lie in the daemon's slot mapping), batches that outlive their
stream, reconfiguration, placement in the sequence, discovery."""

from __future__ import annotations

import gc
import json
import subprocess

import numpy as np
import pytest

import patchflow
from conftest import PYTHON, run, slot_mappings


def rust_batches(rust_client_bin, endpoint, out, *, shared_memory, count=3, start=0, stride=1, **kw):
    """Batches fetched by the Rust client: (metadata lines, folder of bytes)."""
    args = [rust_client_bin, "--endpoint", endpoint, "--dataset", "phantom", "--count", str(count),
            "--start", str(start), "--stride", str(stride), "--shared-memory", shared_memory, "--out", out]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    lines = run(args).stdout.splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("shared_memory", ["on", "off"])
@pytest.mark.parametrize(
    "config",
    [
        dict(patch=(32, 32, 32), batch=2, seed=7),
        dict(patch=(16, 48, 40), batch=3, seed=1, dtype="f16", augment="nnunet"),
    ],
    ids=["f32", "f16-augmented"],
)
def test_voxels_equal_the_rust_clients(daemon, rust_client_bin, tmp_path, shared_memory, config):
    """Python and the Rust client receive the same bytes and items for one configuration and
    seed, over shared memory and over messages; the start/stride placement agrees too."""
    rust_args = dict(patch=",".join(map(str, config["patch"])), batch=config["batch"], seed=config["seed"],
                     dtype=config.get("dtype", "f32"))
    if "augment" in config:
        rust_args["augment"] = config["augment"]
    meta = rust_batches(rust_client_bin, daemon.endpoint, tmp_path, shared_memory=shared_memory,
                        count=3, start=2, stride=3, **rust_args)
    client = patchflow.Client(daemon.endpoint, shared_memory=shared_memory)
    with client.stream("phantom", start_index=2, index_stride=3, **config) as stream:
        for expected in meta:
            batch = next(stream)
            assert batch.index == expected["index"]
            assert list(batch.image.shape) == expected["image_shape"]
            assert list(batch.label.shape) == expected["label_shape"]
            assert batch.image.tobytes() == (tmp_path / f"{batch.index}.image").read_bytes()
            assert batch.label.tobytes() == (tmp_path / f"{batch.index}.label").read_bytes()
            for item, want in zip(batch.items, expected["items"]):
                assert item.case == want["case"]
                assert list(item.origin) == want["origin"]
                assert item.forced_foreground == want["forced_foreground"]
                assert item.class_value == want["class_value"]
                want_aug = None if want["augmentation"] is None else json.loads(want["augmentation"])
                assert item.augmentation == want_aug
            if "augment" in config:
                assert all(item.augmentation is not None for item in batch.items)


def test_shared_memory_batches_are_views_of_the_daemons_slot(client):
    """Zero copy: the arrays (and the tensors, when torch is there) lie inside a mapping of the
    daemon's slot file; over messages they do not."""
    with client.stream("phantom", patch=(32, 32, 32), batch=2) as stream:
        batch = next(stream)
        maps = slot_mappings()
        for array in (batch.image, batch.label):
            address = array.ctypes.data
            inside = [m for m in maps if m[0] <= address and address + array.nbytes <= m[1]]
            assert inside, f"array at {address:#x} is in no /dev/shm mapping: {maps}"
            assert "patchflow" in inside[0][2]
        assert not batch.image.flags.writeable and not batch.image.flags.owndata
        with pytest.raises(ValueError):
            batch.image[0, 0, 0, 0, 0] = 1.0
        try:
            import torch  # noqa: F401
        except ImportError:
            return
        image, label = batch.torch()
        assert image.data_ptr() == batch.image.ctypes.data
        assert label.data_ptr() == batch.label.ctypes.data
    off = patchflow.Client(client.endpoints, shared_memory="off")
    with off.stream("phantom", patch=(32, 32, 32), batch=2) as stream:
        batch = next(stream)
        address = batch.image.ctypes.data
        assert not [m for m in slot_mappings() if m[0] <= address < m[1]]


def test_a_batch_outlives_its_stream(client):
    """A batch (or only a tensor of it) kept after its stream closed and after many more batches
    of other streams still holds its own voxels; its slot goes back once it is dropped."""
    stream = client.stream("phantom", patch=(24, 24, 24), batch=2, seed=3)
    kept = next(stream)
    image, label = kept.image, kept.label
    expected = (image.copy(), label.copy())
    tensor = None
    try:
        import torch  # noqa: F401

        tensor = kept.torch()[0]
    except ImportError:
        pass
    stream.close()
    assert stream.closed
    with pytest.raises(patchflow.FailedPrecondition):
        next(stream)
    del kept
    gc.collect()
    # Other streams reuse the daemon's slots; the kept arrays must not change.
    for seed in range(3):
        with client.stream("phantom", patch=(24, 24, 24), batch=2, seed=100 + seed) as other:
            for _ in range(6):
                next(other)
    np.testing.assert_array_equal(image, expected[0])
    np.testing.assert_array_equal(label, expected[1])
    if tensor is not None:
        np.testing.assert_array_equal(tensor.numpy(), expected[0])


def test_held_batches_beyond_the_slots_do_not_stall(client):
    """Holding more batches than the stream has slots costs copies, never a stall."""
    with client.stream("phantom", patch=(16, 16, 16), batch=1, prefetch=2) as stream:
        held = [next(stream) for _ in range(20)]
        assert [b.index for b in held] == list(range(20))
        assert all(b.image.shape == (1, 1, 16, 16, 16) for b in held)


def test_reconfiguration_applies_from_the_next_batch(client):
    """After reconfigure, batches equal those of a fresh stream opened at that index with the
    new configuration; the index sequence goes on."""
    with client.stream("phantom", patch=(32, 32, 32), batch=2, seed=5) as stream:
        first = [next(stream) for _ in range(3)]
        assert [b.index for b in first] == [0, 1, 2]
        stream.reconfigure(patch=(64, 48, 32), batch=3, policy="uniform")
        assert stream.config["patch"] == (64, 48, 32) and stream.config["seed"] == 5
        after = [next(stream) for _ in range(2)]
    assert [b.index for b in after] == [3, 4]
    assert all(b.image.shape == (3, 1, 64, 48, 32) for b in after)
    with client.stream("phantom", patch=(64, 48, 32), batch=3, seed=5, policy="uniform", start_index=3) as fresh:
        for b in after:
            again = next(fresh)
            assert again.index == b.index
            assert again.image.tobytes() == b.image.tobytes()
            assert again.label.tobytes() == b.label.tobytes()


def test_reconfigure_moves_in_the_sequence_and_changes_policies(client):
    with client.stream("phantom", patch=16, batch=1, class_weights={1: 1.0, 4: 3.0}) as stream:
        b = next(stream)
        assert all(item.class_value in (1, 4) for item in b.items)
        stream.reconfigure(start_index=40, index_stride=5)
        assert [next(stream).index for _ in range(3)] == [40, 45, 50]
        assert stream.next_index == 55 and stream.index_stride == 5
        stream.reconfigure(policy="foreground", fraction=1.0)
        assert stream.config["class_weights"] is None
        b = next(stream)
        assert b.index == 55 and all(item.forced_foreground for item in b.items)


def test_iteration_and_batch_metadata(client):
    with client.stream("phantom", patch=(16, 16, 16), batch=4, seed=2, fraction=0.5) as stream:
        for i, batch in enumerate(stream):
            assert batch.index == i
            assert batch.dtype == "f32" and batch.label_dtype == "u8"
            assert batch.image.dtype == np.float32 and batch.label.dtype == np.uint8
            assert len(batch.items) == 4
            # nnU-Net oversampling: the last round(4 × 0.5) items are forced.
            assert [it.forced_foreground for it in batch.items] == [False, False, True, True]
            assert all(it.case.startswith("phantom_") for it in batch.items)
            if i == 3:
                break
        assert "next_index=4" in repr(stream)


def test_discovery_and_info_command(client, daemon):
    datasets = client.list_datasets()
    assert [d["name"] for d in datasets] == ["phantom"]
    assert datasets[0]["num_cases"] == 4
    (limits,) = client.limits()
    assert limits["max_batch_size"] > 0 and limits["max_shared_slots"] > 0
    desc = client.describe("phantom")
    assert len(desc["cases"]) == 4 and desc["cases"][0]["shape"]
    assert {c["value"] for c in desc["classes"]} >= {0, 1}
    out = subprocess.run([PYTHON, "-m", "patchflow", "info", daemon.endpoint, "--describe"],
                         capture_output=True, text=True, check=True).stdout
    assert "phantom: 4 cases, 1 channel(s)" in out and "max_batch_size" in out and "classes:" in out
    data = json.loads(subprocess.run([PYTHON, "-m", "patchflow", "info", daemon.endpoint, "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert data["datasets"][0]["name"] == "phantom" and data["limits"] == limits


def test_compact_and_plain_messages_give_the_same_arrays(client):
    """Over messages (no shared memory), the compact wire form (stored integer items normalised
    by the client, zstd labels) hands out the arrays the plain form does, bit for bit, and its
    recycled buffers stay valid while a batch is held."""
    compact = patchflow.Client(client.endpoints, shared_memory="off")
    plain = patchflow.Client(client.endpoints, shared_memory="off", compact=False)
    kept = []
    for dtype in ("f32", "f16"):
        with compact.stream("phantom", patch=(40, 24, 56), batch=3, seed=11, dtype=dtype) as a, \
                plain.stream("phantom", patch=(40, 24, 56), batch=3, seed=11, dtype=dtype) as b:
            for _ in range(6):
                x, y = next(a), next(b)
                assert x.image.dtype == y.image.dtype
                assert x.image.tobytes() == y.image.tobytes()
                assert np.array_equal(x.label, y.label)
                kept.append((x, x.image.copy(), x.label.copy()))
    for batch, image, label in kept:
        assert batch.image.tobytes() == image.tobytes()
        assert np.array_equal(batch.label, label)
