"""Fork safety: a forked child (os.fork, multiprocessing, DataLoader workers) starts its own
runtime and connection from an inherited client, never uses the parent's sockets or tasks,
and neither side deadlocks."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import pytest

import patchflow
from conftest import have


def _fingerprint(batch: patchflow.Batch) -> tuple[int, bytes, bytes]:
    return batch.index, batch.image.tobytes(), batch.label.tobytes()


def _child_batches(client: patchflow.Client, start: int) -> list[tuple[int, bytes, bytes]]:
    with client.stream("phantom", patch=(16, 16, 16), batch=2, seed=9, start_index=start) as s:
        return [_fingerprint(next(s)) for _ in range(3)]


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_os_fork_child_reconnects_and_the_parent_goes_on(client, tmp_path):
    # The parent has a connected client, a live stream and a batch when it forks.
    stream = client.stream("phantom", patch=(16, 16, 16), batch=2, seed=9)
    held = next(stream)
    out = tmp_path / "child.pickle"
    pid = os.fork()
    if pid == 0:  # the child: report through a file, never return into pytest
        code = 0
        try:
            result = {"batches": _child_batches(client, 10)}
            try:
                next(stream)
                result["inherited_stream"] = "worked"
            except patchflow.FailedPrecondition as e:
                result["inherited_stream"] = str(e)
            result["held"] = _fingerprint(held)
            out.write_bytes(pickle.dumps(result))
        except BaseException as e:  # noqa: BLE001
            out.write_bytes(pickle.dumps({"error": repr(e)}))
            code = 1
        os._exit(code)
    # The parent keeps streaming while the child works.
    mine = [_fingerprint(next(stream)) for _ in range(5)]
    assert _wait(pid) == 0, pickle.loads(out.read_bytes())
    result = pickle.loads(out.read_bytes())
    assert "forked child" in result["inherited_stream"]
    assert result["held"] == _fingerprint(held), "an inherited batch reads the same bytes"
    assert [m[0] for m in mine] == [1, 2, 3, 4, 5]
    # The child's batches are those of the sequence.
    assert result["batches"] == _child_batches(client, 10)
    stream.close()


def _pool_task(args):
    client, start = args
    return _child_batches(client, start)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_workers(client, method):
    client.list_datasets()  # connected (and its runtime started) before the workers start
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        results = pool.map(_pool_task, [(client, 0), (client, 20)], chunksize=1)
    assert results == [_child_batches(client, 0), _child_batches(client, 20)]


@pytest.mark.skipif(not have("torch"), reason="torch is not installed")
def test_dataloader_workers_each_stream_their_share(client):
    """The documented way is num_workers=0; workers still work: each opens its own stream in its
    own process (here: its interleaved share of one sequence)."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Batches(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            rank, n = (0, 1) if info is None else (info.id, info.num_workers)
            with client.stream("phantom", patch=(16, 16, 16), batch=2, seed=9,
                               start_index=rank, index_stride=n) as s:
                for _ in range(3):
                    b = next(s)
                    yield b.index, torch.from_numpy(b.image.copy())

    client.list_datasets()
    loader = DataLoader(Batches(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = {int(i): img for i, img in loader}
    assert sorted(got) == list(range(6))
    with client.stream("phantom", patch=(16, 16, 16), batch=2, seed=9) as s:
        for k in range(6):
            b = next(s)
            assert torch.equal(got[k], torch.from_numpy(b.image.copy()))
