"""Bad arguments and daemon refusals raise `patchflow.Error` subclasses named after the gRPC
code, with the daemon's (or the client's) message naming what is wrong."""

from __future__ import annotations

import pytest

import patchflow


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch=(32, 32)), "patch"),
        (dict(patch=(0, 32, 32)), "patch"),
        (dict(patch="big"), "patch"),
        (dict(batch=0), "batch"),
        (dict(policy="random"), "policy"),
        (dict(fraction=1.5), "fraction"),
        (dict(policy="uniform", fraction=0.5), "fraction"),
        (dict(class_weights={1: -1.0}), "class_weights"),
        (dict(class_weights={}), "class_weights"),
        (dict(policy="uniform", class_weights={1: 1.0}), "class_weights"),
        (dict(crops_per_case=0), "crops_per_case"),
        (dict(dtype="f64"), "dtype"),
        (dict(seed=-1), "seed"),
        (dict(cases="phantom_000"), "cases"),
        (dict(augment=3), "augment"),
        (dict(augment="nnunet", no_mirror_axes=(3,)), "no_mirror_axes"),
        (dict(no_mirror_axes=(0,)), "no_mirror_axes"),
        (dict(start_index=-1), "start_index"),
        (dict(index_stride=0), "index_stride"),
        (dict(prefetch=0), "prefetch"),
    ],
)
def test_bad_stream_arguments_are_refused_before_sending(client, kwargs, match):
    args = dict(patch=(32, 32, 32), batch=2) | kwargs
    with pytest.raises(patchflow.InvalidArgument, match=match) as info:
        client.stream("phantom", **args)
    assert isinstance(info.value, ValueError) and info.value.code == "INVALID_ARGUMENT"


def test_bad_client_arguments():
    with pytest.raises(patchflow.InvalidArgument, match="shared_memory"):
        patchflow.Client("unix:/tmp/x.sock", shared_memory="maybe")
    with pytest.raises(patchflow.InvalidArgument, match="endpoint"):
        patchflow.Client([])
    with pytest.raises(patchflow.InvalidArgument, match="token"):
        patchflow.Client("unix:/tmp/x.sock", token="a", token_file="/tmp/t")
    with pytest.raises(patchflow.InvalidArgument, match="/nonexistent/token"):
        patchflow.Client("unix:/tmp/x.sock", token_file="/nonexistent/token")
    with pytest.raises(patchflow.InvalidArgument, match="absolute"):
        patchflow.Client("unix:relative.sock").list_datasets()


def test_daemon_refusals_carry_the_code_and_message(client, daemon):
    with pytest.raises(patchflow.NotFound, match="unknown dataset") as info:
        next(client.stream("nope", patch=32, batch=2))
    assert isinstance(info.value, LookupError) and info.value.endpoint == daemon.endpoint
    with pytest.raises(patchflow.NotFound):
        client.describe("nope")
    limit = client.limits()[0]["max_batch_size"]
    with pytest.raises(patchflow.ResourceExhausted, match="batch"):
        next(client.stream("phantom", patch=8, batch=limit + 1))
    with pytest.raises(patchflow.InvalidArgument):
        next(client.stream("phantom", patch=16, batch=1, augment="not-a-preset"))
    # The stream works again after a reconfiguration that fixes it.
    stream = client.stream("phantom", patch=16, batch=1, cases=["no_such_case"])
    with pytest.raises(patchflow.Error) as info:
        next(stream)
    assert info.value.code in ("NOT_FOUND", "INVALID_ARGUMENT")
    stream.reconfigure(cases=None)
    assert next(stream).image.shape == (1, 1, 16, 16, 16)
    stream.close()


def test_unreachable_daemon_is_unavailable(tmp_path):
    client = patchflow.Client(f"unix:{tmp_path}/none.sock", max_attempts=1, connect_timeout=1.0)
    with pytest.raises(patchflow.Unavailable) as info:
        client.list_datasets()
    assert "none.sock" in str(info.value)


def test_token_is_required_and_checked(store, start_daemon, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-tests\n")
    d = start_daemon([store], "--token-file", str(token))
    with pytest.raises(patchflow.Unauthenticated):
        patchflow.Client(d.endpoint).list_datasets()
    with pytest.raises(patchflow.Unauthenticated):
        patchflow.Client(d.endpoint, token="wrong").list_datasets()
    ok = patchflow.Client(d.endpoint, token_file=token)
    assert ok.list_datasets()[0]["name"] == "phantom"
    with ok.stream("phantom", patch=16, batch=1) as s:
        assert next(s).index == 0


def flip_payload_bytes(case):
    """Flips a byte in the middle of every stored chunk payload of a case file, in place (the
    layout of crates/store/FORMAT.md: index offset and length at bytes 40 and 48, 32-byte
    entries of kind (1 zstd, 2 raw), offset and length at +8 and +16)."""
    data = case.read_bytes()
    u64 = lambda at: int.from_bytes(data[at:at + 8], "little")  # noqa: E731
    index, length = u64(40), u64(48)
    flipped = 0
    with open(case, "r+b") as f:
        for entry in range(index, index + length, 32):
            if data[entry] in (1, 2):
                at = u64(entry + 8) + u64(entry + 16) // 2
                f.seek(at)
                f.write(bytes([data[at] ^ 0x5A]))
                flipped += 1
    assert flipped


def test_damaged_data_is_data_loss(store, start_daemon, tmp_path):
    """A corrupted chunk ends the stream that met it with DataLoss naming the case."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    d = start_daemon([damaged], "--cache-mb", "0")
    client = patchflow.Client(d.endpoint)
    assert client.list_datasets()[0]["name"] == "damaged"
    # Damaged while served (the daemon checked the file at start and maps it).
    flip_payload_bytes(damaged / "phantom_000.pfc")
    with pytest.raises(patchflow.DataLoss, match="phantom_000"):
        # The whole case in every batch: the first one reads every chunk. One batch in flight:
        # with more, a batch prepared after the case was set aside may answer first, with
        # FailedPrecondition ("every requested case is set aside").
        with client.stream("damaged", patch=(40, 64, 64), batch=1, cases=["phantom_000"], policy="uniform",
                           prefetch=1) as s:
            for _ in range(16):
                next(s)
    # The case is set aside: listed with its reason.
    (listed,) = client.list_datasets()
    assert [c["id"] for c in listed["set_aside"]] == ["phantom_000"], d.log_text()
