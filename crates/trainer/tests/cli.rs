//! The `patchflow-train` binary: a short run on a phantom store, its report, a resume, the
//! comparison table, and clear errors for bad arguments.

mod common;

use std::process::Command;

use common::{PhantomStore, make_store};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_patchflow-train"));
    c.env("RUST_LOG", "warn");
    c
}

#[test]
fn trains_reports_resumes_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let made = make_store(dir.path(), &PhantomStore::small());
    let out = dir.path().join("run");
    let args = |epochs_stop: Option<&str>| {
        let mut c = bin();
        c.arg("--store")
            .arg(&made.store)
            .args([
                "--curriculum",
                "pgps-performance",
                "--final-patch",
                "8,16,16",
            ])
            .args([
                "--pools",
                "2,3,3",
                "--epochs",
                "4",
                "--iters-per-epoch",
                "2",
            ])
            .args(["--tiny", "--threads", "1", "--device", "cpu", "--seed", "3"])
            .arg("--out")
            .arg(&out);
        if let Some(s) = epochs_stop {
            c.args(["--stop-after", s]);
        }
        c
    };
    let o = args(Some("2")).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("stopped; continue with --resume"),
        "{stdout}"
    );
    let o = args(None).arg("--resume").output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains(&format!("report: {}", out.display())),
        "{stdout}"
    );
    assert!(stdout.contains("val Dice lesion:"), "{stdout}");
    assert!(stdout.contains("best EMA pseudo Dice"), "{stdout}");
    // 8×8×8 for epoch 0, 8×16×8 for epoch 1, 8×16×16 for epochs 2 and 3: a checkpoint named
    // after each size that ended (written by the first, stopped, process), and the best one.
    for f in [
        "metrics.jsonl",
        "plot.png",
        "summary.json",
        "predictions/phantom_002.nii.gz",
        "checkpoint_8x8x8/state.json",
        "checkpoint_8x16x8/state.json",
        "checkpoint_best/state.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs_done"], 4);
    assert_eq!(summary["mode"], "pgps-performance");
    // Performance mode: the batch grows as the patch shrinks (2 × 8·16·16 / 8·8·8 = 8).
    assert_eq!(summary["stages"][0]["batch"], 8);

    let o = bin().arg("compare").arg(&out).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("total") && l.contains("pgps-performance"))
    );

    // Two runs of one curriculum (say, fed in process and by a daemon) are told apart by
    // their folders' names.
    let twin = dir.path().join("twin");
    std::fs::create_dir(&twin).unwrap();
    std::fs::copy(out.join("summary.json"), twin.join("summary.json")).unwrap();
    let o = bin().arg("compare").arg(&out).arg(&twin).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for name in ["pgps-performance (run)", "pgps-performance (twin)"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("total") && l.contains(name)),
            "{name} missing:\n{table}"
        );
    }
}

#[test]
fn bad_arguments_are_explained() {
    let o = bin().args(["--final-patch", "8,16,16"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--store"));

    let dir = tempfile::tempdir().unwrap();
    let made = make_store(
        dir.path(),
        &PhantomStore {
            cases: 2,
            lesions: 1,
            ..PhantomStore::small()
        },
    );
    // At 4×2×2 mm the planner pools y and x twice and z once for 12×24×22 (22 → 11 → 6):
    // 22 is not a multiple of 4.
    let o = bin()
        .arg("--store")
        .arg(&made.store)
        .args([
            "--final-patch",
            "12,24,22",
            "--device",
            "cpu",
            "--threads",
            "1",
        ])
        .args(["--epochs", "1", "--iters-per-epoch", "1"])
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("final_patch") && err.contains("12×24×24"),
        "{err}"
    );
    let o = bin()
        .arg("--store")
        .arg(&made.store)
        .args(["--final-patch", "8,16,16", "--curriculum", "linear"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("linear"));
}

/// A log that is not a terminal (a file, a pipe) gets no colour escape sequences.
#[test]
fn logs_to_a_file_have_no_escape_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let made = make_store(dir.path(), &PhantomStore::small());
    let o = bin()
        .env("RUST_LOG", "info")
        .arg("--store")
        .arg(&made.store)
        .args(["--curriculum", "constant", "--final-patch", "8,16,16"])
        .args([
            "--pools",
            "2,3,3",
            "--epochs",
            "1",
            "--iters-per-epoch",
            "1",
        ])
        .args(["--tiny", "--threads", "1", "--device", "cpu", "--no-export"])
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("epoch done"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape sequences in {stderr:?}");
}
