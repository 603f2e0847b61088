//! The main job end to end, at a small size: `patchflow demo` generates a phantom dataset,
//! ingests it, serves it on a free loopback port, trains against the daemon with PGPS and
//! writes the report, then says where it is.

mod common;

use std::path::PathBuf;

#[test]
fn the_demo_runs_end_to_end_and_says_where_its_report_is() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_patchflow"));
    let trainer = exe.with_file_name("patchflow-train");
    if !trainer.is_file() {
        eprintln!(
            "skipping: {} not built (cargo test --workspace builds it)",
            trainer.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = common::patchflow()
        .arg("demo")
        .arg("--out")
        .arg(&out)
        .args([
            "--cases",
            "3",
            "--shape",
            "16,32,32",
            "--final-patch",
            "16,32,32",
        ])
        .args(["--epochs", "10", "--iters-per-epoch", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report = out.join("report");
    assert!(
        stdout.contains(&format!("report: {}", report.display())),
        "{stdout}"
    );
    for f in [
        "store.txt",
        "store.json",
        "ingest.json",
        "train/metrics.jsonl",
        "train/plot.png",
        "train/summary.json",
        "train/predictions/phantom_002.nii.gz",
    ] {
        assert!(report.join(f).is_file(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("train/summary.json")).unwrap())
            .unwrap();
    assert!(
        summary["source"].as_str().unwrap().starts_with("daemons "),
        "{}",
        summary["source"]
    );
    assert_eq!(summary["mode"], "pgps");
    assert_eq!(summary["epochs_done"], 10);
    // The patch grew through the stream while training.
    let stages = summary["stages"].as_array().unwrap();
    assert!(stages.len() > 1, "{summary}");
    assert_eq!(
        stages.last().unwrap()["patch"],
        serde_json::json!([16, 32, 32])
    );
}
