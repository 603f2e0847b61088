"""`patchflow.nnunet`: nnU-Net v2 trains from a patchflow daemon, on the CPU.

One session fixture makes a small nnU-Net dataset from the project's phantom (nnU-Net's raw
layout, tests/nnunet/nnunet_fixture.py), runs nnU-Net's own `plan_and_preprocess`, ingests the
preprocessed folder and serves it on a Unix socket. The test plan is nnU-Net's with a small patch
(24×16×16, three poolings per axis: four PGPS stages) and a narrow network, so that a few epochs of two iterations run in
seconds. The runs go through `python -m patchflow.nnunet train`; they check nnU-Net's checkpoint,
training log and progress plot, the patch of every step against the schedule, the first batches
against the daemon's for the seed, the live stream (one stream per run), and that `--c` continues
the batch sequence of an uninterrupted run.

Needs nnunetv2 in the environment (`crates/xtask/pyenv-requirements.txt`); skips without it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")
pytest.importorskip("blosc2")

import patchflow  # noqa: E402
from conftest import PYTHON, ROOT, python_env, run  # noqa: E402
from patchflow.nnunet import CLASS_NAMES  # noqa: E402
from patchflow.nnunet._targets import TargetMaker  # noqa: E402

DATASET = "Dataset902_PhantomMR"
PLANS = "nnUNetPlans_pftest"
EPOCHS, ITERATIONS, SEED = 4, 2, 7
TEST_PATCH = [24, 16, 16]


@pytest.fixture(scope="session")
def nnunet_env(patchflow_bin: Path, start_daemon, tmp_path_factory: pytest.TempPathFactory):
    """nnU-Net's folders with the preprocessed phantom, the test plan, and a daemon serving it."""
    base = tmp_path_factory.mktemp("nnunet")
    phantom, raw, pre = base / "phantom", base / "raw", base / "pre"
    run([patchflow_bin, "--quiet", "phantom", phantom, "--cases", "5", "--shape", "24,32,48", "--spacing", "1,1,2"])
    run([PYTHON, ROOT / "tests/nnunet/nnunet_fixture.py", "raw", phantom, raw / DATASET])
    # nnUNet_def_n_proc: one export process in nnU-Net's final validation (each spawned one
    # imports torch and nnU-Net anew)
    env = python_env() | {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(base / "res"),
                          "nnUNet_def_n_proc": "1"}
    run(
        [PYTHON, "-c",
         "import sys\n"
         "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry\n"
         "sys.argv = ['nnUNetv2_plan_and_preprocess', '-d', '902', '-c', '3d_fullres', '-np', '1', '-npfp', '1']\n"
         "plan_and_preprocess_entry()"],
        env=env,
    )
    shutil.rmtree(phantom)
    plans = json.loads((pre / DATASET / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    conf = plans["configurations"]["3d_fullres"]
    conf["patch_size"] = TEST_PATCH
    # three poolings per axis: four PGPS stages (16×8×8 to 24×16×16), and a patch large enough
    # that nnU-Net's final sliding-window validation takes few windows
    arch = conf["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [4, 8, 16, 32]
    arch["kernel_sizes"] = [[3, 3, 3]] * 4
    arch["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * 3
    (pre / DATASET / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))
    # The store is named as nnU-Net names the dataset: the daemon serves it under that name.
    store = base / DATASET
    run([patchflow_bin, "--quiet", "ingest", pre / DATASET / "nnUNetPlans_3d_fullres", "--out", store])
    daemon = start_daemon([store])
    return {"base": base, "pre": pre, "env": env, "daemon": daemon, "plans": plans}


def train(nnunet_env, results: Path, curriculum: str, record: Path, *extra: str, seed: int = SEED):
    """One `python -m patchflow.nnunet train` run on the CPU; returns its fold folder."""
    env = nnunet_env["env"] | {
        "nnUNet_results": str(results),
        "nnUNet_n_proc_DA": "0",
        "PATCHFLOW_NNUNET_RECORD": str(record),
        "PATCHFLOW_NNUNET_SEED": str(seed),
    }
    run(
        [PYTHON, "-m", "patchflow.nnunet", "train", "902", "3d_fullres", "0",
         "--server", nnunet_env["daemon"].endpoint, "--curriculum", curriculum, "-device", "cpu", "-p", PLANS,
         "--epochs", str(EPOCHS), "--iterations", str(ITERATIONS), "--val-iterations", "1",
         # no mirroring keeps nnU-Net's final validation (mirrored test-time augmentation) short
         "--no-mirror-axes", "0,1,2", *extra],
        env=env,
        timeout=900,
    )
    return results / DATASET / f"{CLASS_NAMES[curriculum]}__{PLANS}__3d_fullres" / "fold_0"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_schedule(curriculum: str) -> patchflow.Schedule:
    return patchflow.schedule(TEST_PATCH, (3, 3, 3), EPOCHS, 2, curriculum)


test_schedule.__test__ = False  # a helper, not a test


def check_run(fold: Path, recs: list[dict], curriculum: str, first_epoch: int = 0) -> None:
    """nnU-Net's outputs exist, every step trains the schedule's patch on one live stream."""
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "progress.png").is_file()
    logs = list(fold.glob("training_log_*.txt"))
    assert logs, f"no training log in {fold}"
    log = "\n".join(p.read_text() for p in logs)
    assert "patchflow: data wait" in log
    s = test_schedule(curriculum)
    assert [(r["epoch"], r["step"]) for r in recs] == [
        (e, i) for e in range(first_epoch, EPOCHS) for i in range(ITERATIONS)
    ]
    for r in recs:
        k = r["epoch"] * ITERATIONS + r["step"]
        patch, batch = s.patch_for(r["epoch"], k, SEED)
        assert r["index"] == k
        assert (tuple(r["patch"]), r["batch"]) == (tuple(patch), batch), r
        assert r["target_shapes"][0] == [batch, 1, *patch]
        assert r["streams_opened"] == 1, "a size change reconfigures the live stream"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == CLASS_NAMES[curriculum]
    assert ckpt["init_args"]["patchflow"]["seed"] == SEED
    assert ckpt["init_args"]["patchflow"]["curriculum"] == curriculum
    stage_ckpts = sorted(p.name for p in fold.glob("checkpoint_*x*x*.pth"))
    if curriculum in ("constant", "rpss"):
        assert stage_ckpts == []
    else:
        sizes = [st.patch for st in s.stages[:-1] if st.last_epoch >= first_epoch]
        assert stage_ckpts == sorted(f"checkpoint_{z}x{y}x{x}.pth" for z, y, x in sizes)


def digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="session")
def pgps_run(nnunet_env):
    """An uninterrupted PGPS run (the reference of the resume test)."""
    results = nnunet_env["base"] / "res_pgps"
    record = nnunet_env["base"] / "pgps.jsonl"
    fold = train(nnunet_env, results, "pgps", record)
    return fold, records(record)


def test_pgps_trains_the_schedule_from_the_daemon(nnunet_env, pgps_run):
    fold, recs = pgps_run
    check_run(fold, recs, "pgps")
    # nnU-Net's validation ran on its own loader at the final patch
    assert (fold / "validation" / "summary.json").is_file()
    # The first batches are the daemon's batches 0, 1, ... for the seed and the stage's
    # configuration, over the fold's training cases, turned into nnU-Net's targets.
    splits = json.loads((nnunet_env["pre"] / DATASET / "splits_final.json").read_text())
    cases = sorted(splits[0]["train"])
    assert all(k in cases for r in recs for k in r["keys"])
    s = test_schedule("pgps")
    client = patchflow.Client(nnunet_env["daemon"].endpoint)
    conf = nnunet_env["plans"]["configurations"]["3d_fullres"]
    scales = [[1.0, 1.0, 1.0]]
    for kernel in conf["architecture"]["arch_kwargs"]["strides"][1:-1]:
        scales.append([a / k for a, k in zip(scales[-1], kernel)])
    targets = TargetMaker(scales, mask_channels=[0, 1])
    patch, batch = s.patch_for(0, 0, SEED)
    with client.stream(DATASET, patch, batch, fraction=0.5, augment="nnunet", no_mirror_axes=(0, 1, 2),
                       seed=SEED, cases=cases) as stream:
        for r in recs[:ITERATIONS]:
            served = next(stream)
            image, label = served.torch()
            data, target = targets(image, label, served.ignore_label)
            assert served.index == r["index"]
            assert [i.case for i in served.items] == r["keys"]
            assert digest(data) == r["data"]
            assert digest(target[0]) == r["target"]
            assert [list(t.shape) for t in target] == r["target_shapes"]


def test_resume_continues_the_batch_sequence(nnunet_env, pgps_run):
    """`--c` from the checkpoint saved at the first size change past epoch 1 trains exactly the
    batches the uninterrupted run trained from there (the seed comes from the checkpoint)."""
    fold, recs = pgps_run
    s = test_schedule("pgps")
    resume_epoch = s.stages[2].first_epoch  # checkpoint of stage 2's patch, saved when stage 3 begins
    name = "checkpoint_{}x{}x{}.pth".format(*s.stages[1].patch)
    results = nnunet_env["base"] / "res_resume"
    fold2 = results / fold.relative_to(nnunet_env["base"] / "res_pgps")
    fold2.mkdir(parents=True)
    shutil.copy(fold / name, fold2 / "checkpoint_latest.pth")
    record = nnunet_env["base"] / "resume.jsonl"
    train(nnunet_env, results, "pgps", record, "--c", seed=99)
    resumed = records(record)
    assert resumed[0]["epoch"] == resume_epoch
    original = [r for r in recs if r["epoch"] >= resume_epoch]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "streams_opened"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(original)
    check_run(fold2, resumed, "pgps", first_epoch=resume_epoch)
    log = "\n".join(p.read_text() for p in fold2.glob("training_log_*.txt"))
    assert f"seed {SEED} (PATCHFLOW_NNUNET_SEED 99 ignored)" in log


def test_every_curriculum_trains(nnunet_env):
    """The four other classes, one after the other in one interpreter (nnU-Net's imports once)."""
    base = nnunet_env["base"]
    results = base / "res_modes"
    modes = ["constant", "pgps-plus", "pgps-performance", "rpss"]
    driver = (
        "import os, sys\n"
        "from patchflow.nnunet.__main__ import main\n"
        "for mode in sys.argv[1].split(','):\n"
        f"    os.environ['PATCHFLOW_NNUNET_RECORD'] = os.path.join({str(base)!r}, mode + '.jsonl')\n"
        "    args = ['train', '902', '3d_fullres', '0', '--server', sys.argv[2], '--curriculum', mode,\n"
        f"            '-device', 'cpu', '-p', {PLANS!r}, '--epochs', '{EPOCHS}', '--iterations', '{ITERATIONS}',\n"
        "            '--val-iterations', '1', '--no-mirror-axes', '0,1,2']\n"
        "    assert main(args) == 0\n"
    )
    env = nnunet_env["env"] | {"nnUNet_results": str(results), "nnUNet_n_proc_DA": "0",
                               "PATCHFLOW_NNUNET_SEED": str(SEED)}
    run([PYTHON, "-c", driver, ",".join(modes), nnunet_env["daemon"].endpoint], env=env, timeout=1500)
    for mode in modes:
        fold = results / DATASET / f"{CLASS_NAMES[mode]}__{PLANS}__3d_fullres" / "fold_0"
        check_run(fold, records(base / f"{mode}.jsonl"), mode)
    # the curricula differ where they should
    rpss = records(base / "rpss.jsonl")
    assert len({tuple(r["patch"]) for r in rpss}) > 1
    plus = records(base / "pgps-plus.jsonl")
    assert plus[0]["batch"] > plus[-1]["batch"] == 2


def test_targets_are_nnunets():
    """`TargetMaker` gives what nnU-Net's transforms after augmentation give (RemoveLabel −1→0,
    deep-supervision downsampling, regions with the ignore label), item by item."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    g = torch.Generator().manual_seed(0)
    scales = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]
    label = torch.randint(0, 4, (2, 1, 12, 8, 8), generator=g).to(torch.uint8)
    label[0, 0, :3] = 255  # padding beyond the volume
    image = torch.randn((2, 2, 12, 8, 8), generator=g)
    for regions, ignore in ((None, None), ([[1, 2, 3], [2, 3], [3]], None), ([[1, 2], [2]], 3)):
        mine_data, mine = TargetMaker(scales, regions=regions, ignore_label=ignore, mask_channels=[1])(image, label, 255)
        ref = nnUNetTrainer.get_validation_transforms(scales, regions=regions, ignore_label=ignore)
        for b in range(2):
            seg = label[b].to(torch.int16).masked_fill(label[b] == 255, -1)
            pad = seg[0] == -1
            out = ref(image=image[b].clone(), segmentation=seg.clone())
            for mt, rt in zip(mine, out["segmentation"]):
                assert mt[b].dtype == rt.dtype
                assert torch.equal(mt[b], rt)
            assert torch.equal(mine_data[b, 0], image[b, 0])
            assert torch.equal(mine_data[b, 1], image[b, 1].masked_fill(pad, 0.0))



def test_nnunetv2_train_finds_the_trainers(monkeypatch):
    """`nnUNetv2_train -tr NAME` finds every class through `nnUNet_extTrainer`."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import patchflow.nnunet as pfn
    from patchflow.nnunet import trainers

    out = run([PYTHON, "-m", "patchflow.nnunet", "trainer-path"], env=python_env()).stdout.strip()
    assert out == pfn.trainer_path()
    monkeypatch.setenv("nnUNet_extTrainer", out)
    for mode, name in CLASS_NAMES.items():
        cls = recursive_find_trainer_class_by_name(name)
        assert cls is getattr(trainers, name)
        assert cls.curriculum == mode
