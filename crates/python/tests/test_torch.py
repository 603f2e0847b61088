"""`patchflow.torch.CurriculumLoader`: follows the schedule on one live stream, splits one
sequence over ranks (also under torch.distributed with gloo), resumes from a state_dict."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import patchflow  # noqa: E402
import patchflow.torch as pft  # noqa: E402
from conftest import PYTHON, python_env  # noqa: E402

IPE = 4  # iterations per epoch in these tests


def small_schedule(mode: str = "pgps", epochs: int = 5) -> patchflow.Schedule:
    return patchflow.schedule(final_patch=(32, 32, 32), pools=(4, 4, 4), epochs=epochs, batch=2, mode=mode)


def digest(image, label) -> str:
    h = hashlib.sha256()
    h.update(image.numpy().tobytes())
    h.update(label.numpy().tobytes())
    return h.hexdigest()


def run_epochs(loader: pft.CurriculumLoader, epochs) -> list[tuple[int, tuple[int, ...], str]]:
    out = []
    for epoch in epochs:
        for image, label in loader.epoch(epoch):
            out.append((loader.last_batch.index, tuple(image.shape), digest(image, label)))
    return out


def test_the_loader_follows_the_schedule_on_one_live_stream(client):
    s = small_schedule()
    loader = pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=3, fraction=0.5)
    stream = None
    seen = []
    for epoch in range(s.epochs):
        for i, (image, label) in enumerate(loader.epoch(epoch)):
            k = epoch * IPE + i
            patch, batch = s.patch_for(epoch, k, seed=3)
            assert tuple(image.shape) == (batch, 1, *patch)
            assert tuple(label.shape) == (batch, 1, *patch)
            assert image.dtype == torch.float32 and label.dtype == torch.uint8
            assert loader.last_batch.index == k
            if stream is None:
                stream = loader._stream
            assert loader._stream is stream, "stage changes reconfigure the live stream"
            seen.append(patch)
    assert len(seen) == s.epochs * IPE
    assert sorted(set(seen)) == sorted({st.patch for st in s.stages})
    # Batch k is the batch k of a plain stream with that step's configuration.
    k = 2 * IPE + 1
    patch, batch = s.patch_for(2, k, seed=3)
    with client.stream("phantom", patch=patch, batch=batch, seed=3, fraction=0.5, start_index=k) as plain:
        b = next(plain)
    again = pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=3, fraction=0.5)
    images = [img for _, (img, _) in zip(range(2), again.epoch(2))]
    assert torch.equal(images[1], b.torch()[0])
    loader.close()
    again.close()


@pytest.mark.parametrize("mode", ["pgps-performance", "rpss"])
def test_other_modes_follow_their_schedule(client, mode):
    s = small_schedule(mode)
    loader = pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=1)
    for epoch in (0, s.epochs - 1):
        for i, (image, _) in enumerate(loader.epoch(epoch)):
            patch, batch = s.patch_for(epoch, epoch * IPE + i, seed=1)
            assert tuple(image.shape) == (batch, 1, *patch)


def test_ranks_split_the_one_process_sequence(client):
    s = small_schedule()
    one = run_epochs(pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=5), range(3))
    shares = [
        run_epochs(pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=5, rank=r, world_size=2), range(3))
        for r in range(2)
    ]
    assert [x[0] for x in shares[0]] == [k for k in range(3 * IPE) if k % 2 == 0]
    assert sorted(shares[0] + shares[1]) == sorted(one)


def test_two_rank_distributed_training_sees_the_one_process_sequence(client, daemon, tmp_path):
    """Two gloo ranks (CPU) train a small DDP model for two epochs; together they receive
    exactly the batches one process receives."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = python_env() | {"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"}
    init = f"file://{tmp_path}/rendezvous"
    procs = [
        subprocess.Popen([PYTHON, str(worker), daemon.endpoint, init, str(rank), "2", str(tmp_path / f"rank{rank}.json")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    s = small_schedule()
    one = run_epochs(pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=7, augment="nnunet"), range(2))
    got = sorted(tuple((b[0], tuple(b[1]), b[2])) for r in ranks for b in r["batches"])
    assert got == sorted(one)
    assert [b[0] for b in ranks[1]["batches"]] == [k for k in range(2 * IPE) if k % 2 == 1]
    # DDP kept the replicas equal.
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_resume_from_a_state_dict(client):
    s = small_schedule()
    make = lambda: pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=11)  # noqa: E731
    whole = run_epochs(make(), range(4))
    first = make()
    part = run_epochs(first, range(2))
    it = first.epoch(2)
    image, label = next(it)
    part.append((first.last_batch.index, tuple(image.shape), digest(image, label)))
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == (2, 1)
    first.close()
    # Through torch.save/torch.load, as a checkpoint would.
    buf = io.BytesIO()
    torch.save({"loader": state}, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)["loader"]
    second = make()
    second.load_state_dict(restored)
    assert second.next_epoch == 2
    rest = run_epochs(second, range(2, 4))
    assert part + rest == whole
    # A state saved at the end of an epoch resumes with the next epoch.
    third = make()
    third.load_state_dict(second.state_dict())
    assert third.next_epoch == 4
    with pytest.raises(patchflow.InvalidArgument, match="seed"):
        pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=12).load_state_dict(state)


def test_device_and_pinning_options(client):
    s = small_schedule()
    loader = pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, device="cpu")
    image, label = next(loader.epoch(0))
    assert image.device.type == "cpu" and tuple(image.shape) == (2, 1, *s.patch_for(0, 0)[0])
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pin_memory"):
            pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, pin_memory=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_device_and_pinned_copies_equal_the_host_batches(client):
    """`device="cuda"` goes through the pinned double buffer; every tensor must equal the host
    batch it came from, also after the buffers were reused and across a stage change."""
    s = small_schedule()
    host = pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=5)
    gpu = pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=5, device="cuda")
    pinned = pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=IPE, seed=5, pin_memory=True)
    shapes = set()
    for epoch in range(s.epochs):
        held = []  # GPU tensors kept alive while later batches reuse the pinned buffers
        for (hi, hl), (gi, gl), (pi, pl) in zip(host.epoch(epoch), gpu.epoch(epoch), pinned.epoch(epoch)):
            assert gi.device.type == "cuda" and gl.device.type == "cuda"
            assert gi.dtype == torch.float32 and gl.dtype == torch.uint8
            assert pi.is_pinned() and pl.is_pinned()
            assert torch.equal(pi, hi) and torch.equal(pl, hl)
            held.append((hi.clone(), hl.clone(), gi, gl))
            shapes.add(tuple(gi.shape))
        torch.cuda.synchronize()
        for hi, hl, gi, gl in held:
            assert torch.equal(gi.cpu(), hi) and torch.equal(gl.cpu(), hl)
    assert len(shapes) > 1, "the schedule's stages changed the patch"


def test_bad_loader_arguments(client):
    s = small_schedule()
    with pytest.raises(patchflow.InvalidArgument, match="ranks"):
        pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=5, rank=0, world_size=2)
    with pytest.raises(patchflow.InvalidArgument, match="rank"):
        pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=4, rank=1)
    with pytest.raises(patchflow.InvalidArgument, match="rank"):
        pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=4, rank=2, world_size=2)
    with pytest.raises(patchflow.InvalidArgument, match="schedule"):
        pft.CurriculumLoader(client, "phantom", {"epochs": 3}, iters_per_epoch=4)
    with pytest.raises(patchflow.InvalidArgument, match="policy"):
        next(pft.CurriculumLoader(client, "phantom", s, iters_per_epoch=4, policy="x").epoch(0))
