"""The schedule from Python is the Rust curriculum's: equal to `patchflow schedule --json` for
every mode the curriculum crate lists, and its per-epoch and per-iteration answers agree with
its stages (and, for rpss, with the normative draw)."""

from __future__ import annotations

import json
import pickle

import pytest

import patchflow
from conftest import run

CASES = [
    dict(final_patch=(128, 128, 128), pools=(5, 5, 5), epochs=1000, batch=2),
    dict(final_patch=(40, 224, 192), pools=(3, 5, 5), epochs=300, batch=4),
    dict(final_patch=(64, 96, 80), pools=(4, 4, 4), epochs=37, batch=3),
]

MASK = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def rpss_index(seed: int, iteration: int, n: int) -> int:
    """The normative rpss draw (patchflow_curriculum::rpss_stage), written out independently."""
    if n <= 1:
        return 0
    _, key = splitmix64(seed)
    state = key ^ iteration
    threshold = ((1 << 64) - n) % n
    while True:
        state, r = splitmix64(state)
        if r >= threshold:
            return r % n


def test_modes_come_from_the_curriculum_crate():
    modes = patchflow.modes()
    assert "rpss" in modes and "constant" in modes and len(modes) == len(set(modes)) >= 4
    # `pgps` is accepted as the short name of the efficiency mode.
    assert patchflow.schedule(128, 5, 100, 2, mode="pgps").mode == patchflow.schedule(128, 5, 100, 2).mode


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["final_patch"])))
def test_every_mode_equals_the_command_line(patchflow_bin, case):
    for mode in patchflow.modes():
        s = patchflow.schedule(mode=mode, **case)
        cli = json.loads(run([
            patchflow_bin, "--quiet", "schedule", "--json", "--mode", mode,
            "--final-patch", ",".join(map(str, case["final_patch"])),
            "--pools", ",".join(map(str, case["pools"])),
            "--epochs", str(case["epochs"]), "--batch", str(case["batch"]),
        ]).stdout)
        assert s.to_json() == cli, mode
        assert s.mode == cli["mode"]
        assert [list(st.patch) for st in s.stages] == [st["patch"] for st in cli["stages"]]
        assert [st.batch for st in s.stages] == [st["batch"] for st in cli["stages"]]
        assert s.relative_cost == pytest.approx(cli["relative_cost"])
        if "sizes" in cli:
            assert [list(p) for p in s.sizes] == cli["sizes"]
        # The stages' sizes are PGPS sizes, smallest first, ending at the final patch.
        assert s.sizes[-1] == tuple(case["final_patch"])
        assert {st.patch for st in s.stages} <= set(s.sizes)
        # Round trip through JSON and pickle.
        assert patchflow.Schedule.from_json(cli) == s
        assert pickle.loads(pickle.dumps(s)) == s


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["final_patch"])))
def test_stage_and_patch_per_epoch_and_iteration(case):
    for mode in patchflow.modes():
        s = patchflow.schedule(mode=mode, **case)
        ipe = 7
        for epoch in range(0, s.epochs + 3, max(1, s.epochs // 41)):
            stage = s.stage_for(epoch)
            for it in (epoch * ipe, epoch * ipe + 3):
                patch, batch = s.patch_for(epoch, it, seed=11)
                if mode == "rpss":
                    drawn = s.stages[rpss_index(11, it, len(s.stages))]
                    assert (patch, batch) == (drawn.patch, drawn.batch)
                else:
                    assert (patch, batch) == (stage.patch, stage.batch)
                    assert stage.first_epoch <= epoch <= stage.last_epoch or stage is s.stages[-1]


def test_rpss_draws_every_size():
    s = patchflow.schedule((128, 128, 128), (5, 5, 5), 1000, 2, mode="rpss")
    drawn = {s.patch_for(0, i, seed=4)[0] for i in range(400)}
    assert drawn == set(s.sizes)


def test_bad_schedules_raise_clear_errors():
    with pytest.raises(patchflow.InvalidArgument, match="mode"):
        patchflow.schedule(128, 5, 100, 2, mode="fastest")
    with pytest.raises(patchflow.InvalidArgument, match="final_patch"):
        patchflow.schedule((128, 128), 5, 100, 2)
    with pytest.raises(patchflow.InvalidArgument):
        patchflow.schedule(128, 5, 3, 2, mode=patchflow.modes()[0])  # fewer epochs than stages
    with pytest.raises(patchflow.InvalidArgument):
        patchflow.schedule(16, 5, 100, 2)  # final edge below 2^pools
    with pytest.raises(patchflow.InvalidArgument, match="epoch"):
        patchflow.schedule(128, 5, 100, 2).stage_for(-1)
    with pytest.raises(ValueError):  # InvalidArgument is a ValueError
        patchflow.Schedule.from_json({"mode": "constant"})
