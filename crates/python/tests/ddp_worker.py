"""One rank of the two-rank test in test_torch.py: joins a gloo process group (file rendezvous,
no fixed port), trains a small DDP model for two epochs from a CurriculumLoader that takes its
rank from torch.distributed, and writes the batches it saw and its final weights.

    python ddp_worker.py ENDPOINT INIT_METHOD RANK WORLD_SIZE OUT.json
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import patchflow
import patchflow.torch as pft


def main() -> None:
    endpoint, init, rank, world, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Conv3d(1, 2, 3, padding=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    s = patchflow.schedule(final_patch=(32, 32, 32), pools=(4, 4, 4), epochs=5, batch=2)
    loader = pft.CurriculumLoader(patchflow.Client(endpoint), "phantom", s, iters_per_epoch=4, seed=7, augment="nnunet")
    assert (loader.rank, loader.world_size) == (rank, world)
    seen = []
    for epoch in range(2):
        for image, label in loader.epoch(epoch):
            h = hashlib.sha256()
            h.update(image.numpy().tobytes())
            h.update(label.numpy().tobytes())
            seen.append((loader.last_batch.index, list(image.shape), h.hexdigest()))
            opt.zero_grad()
            logits = model(image)
            loss = torch.nn.functional.cross_entropy(logits, (label[:, 0] > 0).long())
            loss.backward()
            opt.step()
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    with open(out, "w") as f:
        json.dump({"batches": seen, "weights": weights}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
