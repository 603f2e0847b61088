//! The GPU benchmark script in its CPU mode, on the real CT it uses (skipped when the shared
//! test data is absent).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn gpu_bench_script_runs_in_cpu_tiny_mode() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = root.join("../shared/data");
    if !data.join("ct_totalseg/aorta_ct_cropped.nii.gz").is_file() {
        eprintln!("skipping: {} not found", data.display());
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(root.join("benches/gpu/run.sh"))
        .arg("--cpu-tiny")
        .env("PATCHFLOW_TRAIN", env!("CARGO_BIN_EXE_patchflow-train"))
        .env("BENCH_DATA", &data)
        .env("BENCH_OUT", work.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    // One table: the 21 timed steps of the plan's modes (9 sizes at batch 2, 5 larger PGPS+
    // batches, 7 larger performance batches), the stages of each run, a total row per run,
    // then the projection.
    let rows: Vec<&str> = stdout.lines().collect();
    let timed = rows
        .iter()
        .filter(|l| l.starts_with("stage timing"))
        .count();
    assert_eq!(timed, 21, "{stdout}");
    for mode in ["constant", "pgps", "pgps-performance"] {
        let total = rows
            .iter()
            .find(|l| l.starts_with("total") && l.split_whitespace().nth(1) == Some(mode))
            .unwrap_or_else(|| panic!("no total row for {mode}:\n{stdout}"));
        let cells: Vec<&str> = total.split_whitespace().collect();
        // total, mode, patch, batch, iters, s/iter, time, ratio, wait, dice
        assert_eq!(cells.len(), 10, "{total}");
        assert_eq!(cells[2], "16×32×32");
        assert_eq!(cells[4], "40");
        let ratio: f64 = cells[7].parse().unwrap();
        assert!(ratio > 0.0);
        assert!(cells[8].ends_with('%'));
        let dice: f64 = cells[9].parse().unwrap();
        assert!((0.0..=1.0).contains(&dice));
        if mode == "constant" {
            assert_eq!(cells[7], "1.00");
        }
    }
    let stage_rows = rows.iter().filter(|l| l.starts_with("pgps stages")).count();
    assert_eq!(stage_rows, 9);
    assert!(work.path().join("table.txt").is_file());

    // The projection: every mode's time for 1000 epochs × 250 iterations against constant,
    // beside the paper's figures and the voxel ratio.
    let at = rows
        .iter()
        .position(|l| l.starts_with("projected training time of 1000 epochs × 250"))
        .unwrap_or_else(|| panic!("no projection:\n{stdout}"));
    let projected: Vec<Vec<&str>> = rows[at + 3..at + 8]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let modes: Vec<&str> = projected.iter().map(|c| c[0]).collect();
    assert_eq!(
        modes,
        ["pgps", "pgps-plus", "pgps-performance", "rpss", "constant"]
    );
    for cells in &projected {
        let hours: f64 = cells[2].parse().unwrap();
        let ratio: f64 = cells[3].parse().unwrap();
        assert!(hours > 0.0 && ratio > 0.0, "{cells:?}");
    }
    assert_eq!(projected[4][3], "1.00");
    assert_eq!(projected[0][4], "0.44");
    assert_eq!(projected[2][4], "0.89");
    // Voxels of the 16×32×32 plan (pools 2,3,3) over 1000 epochs, in units of 8³: the first
    // eight sizes (1 + 2 + 4 + 6 + 9 + 13.5 + 18 + 24) for 111 epochs each and 32 for 112, over
    // 32 × 1000: 0.38 for PGPS, as for 128³.
    assert_eq!(projected[0].last(), Some(&"0.38"));
    assert_eq!(projected[4].last(), Some(&"1.00"));
    let projection: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(work.path().join("projection.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(projection.as_array().unwrap().len(), 5);
    assert!(work.path().join("runs/pgps-performance/plot.png").is_file());
    assert!(
        work.path()
            .join("runs/constant/predictions/slab_2.nii.gz")
            .is_file()
    );

    // daemon.sh: the same PGPS run fed by a local daemon trains identically on the
    // CPU (same batches, same weights), so it ends with the same validation Dice.
    let train_bin = PathBuf::from(env!("CARGO_BIN_EXE_patchflow-train"));
    let daemon_bin = train_bin.with_file_name("patchflow");
    if !daemon_bin.is_file() {
        eprintln!(
            "skipping daemon.sh: {} not built (cargo test --workspace builds it)",
            daemon_bin.display()
        );
        return;
    }
    let fed = work.path().join("daemon");
    let out = Command::new("bash")
        .arg(root.join("benches/gpu/daemon.sh"))
        .arg(work.path().join("store"))
        .arg(&fed)
        .args(["--curriculum", "pgps", "--epochs", "10"])
        .args(["--iters-per-epoch", "4", "--final-patch", "16,32,32"])
        .args(["--tiny", "--threads", "1", "--device", "cpu"])
        .env("PATCHFLOW", &daemon_bin)
        .env("PATCHFLOW_TRAIN", &train_bin)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("data wait"), "{stdout}");
    // The training stream ends and the validation loads cases on the same connection: no
    // stream may fail and reconnect on the way (one did while each source had a runtime of
    // its own and the first one's end took the shared connection with it).
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !text.contains("stream failed") && !text.contains("reconnecting"),
            "{name} of daemon.sh:\n{text}"
        );
    }
    let summary = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
    };
    let fed = summary(&fed);
    let local = summary(&work.path().join("runs/pgps"));
    assert!(
        fed["source"].as_str().unwrap().starts_with("daemons unix:"),
        "{}",
        fed["source"]
    );
    assert_eq!(fed["stages"].as_array().unwrap().len(), 9);
    assert_eq!(
        fed["validation"]["mean_foreground_dice"], local["validation"]["mean_foreground_dice"],
        "the daemon-fed run trained differently"
    );
}
