//! `patchflow bench`: the suite on a small generated dataset, the single-core peer mode on a
//! store of real cases, and the load mode, each run through the real binary and checked
//! through its JSON.

mod common;

use common::{run, run_ok, s, shared_data};
use serde_json::Value;

fn json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn suite_measures_every_size_mode_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("bench");
    let out = run_ok(&[
        "bench",
        "--work-dir",
        s(&work),
        "--cases",
        "2",
        "--shape",
        "24,40,40",
        "--edges",
        "16,24",
        "--pgps-final",
        "32,32,16",
        "--pools",
        "4,4,3",
        "--clients",
        "1,2",
        "--workers",
        "2",
        "--seconds",
        "0.3",
        "--cold-batches",
        "2",
        "--cache-mb",
        "64",
    ]);
    assert!(out.contains("loopback gRPC / in-process"), "{out}");
    let r = json(&work.join("bench.json"));
    assert_eq!(r["version"], 1);
    assert!(r["command"].as_str().unwrap().contains("bench"));
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(r["machine"]["memory_bytes"].as_u64().unwrap() > 0);
    let ingest = &r["ingest"];
    assert_eq!(ingest["cases"], 2);
    assert!(ingest["raw_bytes"].as_u64().unwrap() == 2 * 24 * 40 * 40 * 3);
    assert!(ingest["input_mb_per_s"].as_f64().unwrap() > 0.0);
    // Sizes: 16³, 24³ and the PGPS stages of 32×32×16 with pools 4,4,3 (8×16×16 ... 32×32×16
    // as the curriculum grows them), each once.
    let stages = run_ok(&[
        "schedule",
        "--final-patch",
        "32,32,16",
        "--pools",
        "4,4,3",
        "--json",
    ]);
    let stages: Value = serde_json::from_str(&stages).unwrap();
    let mut sizes: Vec<Vec<u64>> = stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| {
            st["patch"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        })
        .collect();
    sizes.push(vec![16, 16, 16]);
    sizes.push(vec![24, 24, 24]);
    sizes.sort();
    sizes.dedup();
    let ms = r["measurements"].as_array().unwrap();
    // Per size: in-process warm + cold, gRPC warm with 1 and 2 clients, gRPC with shared memory
    // warm, gRPC cold.
    assert_eq!(ms.len(), sizes.len() * 6, "{ms:#?}");
    for size in &sizes {
        let of = |t: &str, st: &str, c: u64| {
            ms.iter()
                .filter(|m| {
                    m["transport"] == t
                        && m["state"] == st
                        && m["clients"] == c
                        && m["patch"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_u64().unwrap())
                            .collect::<Vec<_>>()
                            == *size
                })
                .count()
        };
        assert_eq!(of("in-process", "warm", 1), 1, "{size:?}");
        assert_eq!(of("in-process", "cold", 1), 1, "{size:?}");
        assert_eq!(of("grpc", "warm", 1), 1, "{size:?}");
        assert_eq!(of("grpc", "warm", 2), 1, "{size:?}");
        assert_eq!(of("grpc", "cold", 1), 1, "{size:?}");
        assert_eq!(of("grpc-shared", "warm", 1), 1, "{size:?}");
    }
    for m in ms {
        let patches = m["patches"].as_u64().unwrap();
        assert!(patches > 0, "{m}");
        assert_eq!(patches, m["batches"].as_u64().unwrap() * 2, "batch 2: {m}");
        assert!(m["patches_per_s"].as_f64().unwrap() > 0.0);
        // Bytes delivered per patch: f32 image + u8 label of the patch's voxels.
        let voxels: u64 = m["patch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .product();
        let per_patch =
            m["mb_per_s"].as_f64().unwrap() * 1e6 / m["patches_per_s"].as_f64().unwrap();
        assert!((per_patch - (voxels * 5) as f64).abs() < 1.0, "{m}");
        if m["state"] == "cold" {
            assert_eq!(m["batches"], 2, "{m}");
        }
        if m["transport"] == "grpc" || m["transport"] == "grpc-shared" {
            assert!(m["daemon_peak_rss_bytes"].as_u64().unwrap() > 0);
            assert!(m["client_cpu_s_per_patch"].as_f64().is_some());
        }
    }
    let loopback = r["loopback"].as_array().unwrap();
    assert!(!loopback.is_empty());
    assert!(
        loopback
            .iter()
            .all(|l| l["shared_ratio"].as_f64().unwrap() > 0.0)
    );
    let png = std::fs::read(work.join("bench.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // A rerun on the existing store skips generation and ingest.
    let store = work.join("store");
    let json2 = dir.path().join("again.json");
    run_ok(&[
        "bench",
        "--work-dir",
        s(&work),
        "--store",
        s(&store),
        "--edges",
        "16",
        "--no-pgps",
        "--no-daemon",
        "--no-cold",
        "--seconds",
        "0.2",
        "--json",
        s(&json2),
    ]);
    let r2 = json(&json2);
    assert!(r2["ingest"].is_null());
    assert_eq!(r2["measurements"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_settings_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (args, flag) in [
        (vec!["--cases", "0"], "--cases"),
        (vec!["--foreground", "1.5"], "--foreground"),
        (vec!["--edges", "0"], "--edges"),
        (vec!["--seconds", "0"], "--seconds"),
    ] {
        let mut full = vec!["bench", "--work-dir", s(dir.path()), "--no-daemon"];
        full.extend(args);
        let out = run(&full);
        assert!(!out.status.success(), "{full:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{full:?}: {err}");
    }
}

/// Ingests two real CT pairs into a store under `dir`.
fn real_store(dir: &std::path::Path, data: &std::path::Path) -> std::path::PathBuf {
    let tsv = dir.join("pairs.tsv");
    let ct = data.join("ct_totalseg");
    std::fs::write(
        &tsv,
        format!(
            "image\tlabel\n{}\t{}\n{}\t{}\n",
            s(&ct.join("aorta_ct_cropped.nii.gz")),
            s(&ct.join("aorta_aorta.nii.gz")),
            s(&ct.join("pulm_ct_cropped.nii.gz")),
            s(&ct.join("pulm_pulmonary_artery.nii.gz")),
        ),
    )
    .unwrap();
    let store = dir.join("ct");
    run_ok(&["ingest", s(&tsv), "--out", s(&store)]);
    store
}

#[test]
fn peer_mode_on_real_cases_in_process_and_over_grpc() {
    let Some(data) = shared_data("peer_mode_on_real_cases_in_process_and_over_grpc") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = real_store(dir.path(), &data);
    for (transport, augment) in [
        ("inproc", "none"),
        ("grpc", "none"),
        ("inproc", "nnunet"),
        ("grpc", "nnunet"),
        ("grpc-shm", "none"),
    ] {
        let out_json = dir.path().join(format!("{transport}-{augment}.json"));
        let out = run_ok(&[
            "bench",
            "peer",
            "--store",
            s(&store),
            "--patch",
            "32,48,48",
            "--batch",
            "2",
            "--seconds",
            "0.5",
            "--transport",
            transport,
            "--augment",
            augment,
            "--json",
            s(&out_json),
        ]);
        let printed: Value = serde_json::from_str(out.trim()).expect("one JSON line");
        let written = json(&out_json);
        assert_eq!(printed, written);
        assert_eq!(written["tool"], "patchflow");
        assert_eq!(written["augment"], augment);
        let patches = written["patches"].as_u64().unwrap();
        assert!(patches >= 2 && patches.is_multiple_of(2), "{written}");
        assert!(written["cpu_s"].as_f64().unwrap() > 0.0);
        let per_cpu = written["patches_per_cpu_s"].as_f64().unwrap();
        let expect = patches as f64 / written["cpu_s"].as_f64().unwrap();
        assert!(
            (per_cpu - expect).abs() < 1e-6 * expect.max(1.0),
            "{written}"
        );
    }
}

#[test]
fn ratio_mode_on_real_cases_reports_every_path_in_every_round() {
    let Some(data) = shared_data("ratio_mode_on_real_cases_reports_every_path_in_every_round")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = real_store(dir.path(), &data);
    let out_json = dir.path().join("ratio.json");
    let out = run_ok(&[
        "bench",
        "ratio",
        "--store",
        s(&store),
        "--edges",
        "16,24",
        "--seconds",
        "0.2",
        "--rounds",
        "2",
        "--ring",
        "3",
        "--grpc",
        "--json",
        s(&out_json),
    ]);
    let report = json(&out_json);
    let paths = [
        "in-process",
        "in-process ring 3",
        "gRPC+shm",
        "gRPC plain",
        "gRPC",
    ];
    // Every path at every edge in every round, in the order measured.
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 * 2 * paths.len(), "{report}");
    for (i, run) in runs.iter().enumerate() {
        let round = i / (2 * paths.len());
        assert_eq!(run["round"].as_u64().unwrap() as usize, round, "{run}");
        assert_eq!(run["path"], paths[i % paths.len()], "{run}");
        let patches = run["patches"].as_u64().unwrap();
        assert!(patches >= 2 && patches.is_multiple_of(2), "{run}");
        assert!(run["cpu_s"].as_f64().unwrap() > 0.0, "{run}");
    }
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * paths.len());
    for row in rows {
        let ratio = &row["wall_ratio"];
        let (lo, mid, hi) = (
            ratio["min"].as_f64().unwrap(),
            ratio["median"].as_f64().unwrap(),
            ratio["max"].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{row}");
        if row["path"] == "in-process" {
            assert_eq!((lo, hi), (1.0, 1.0), "the reference against itself: {row}");
        }
        assert!(
            out.contains(&format!(
                "| {}³ | {} |",
                row["edge"],
                row["path"].as_str().unwrap()
            )),
            "{out}"
        );
    }
}

#[test]
fn load_mode_runs_many_changing_streams_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("w");
    run_ok(&[
        "bench",
        "--work-dir",
        s(&work),
        "--cases",
        "2",
        "--shape",
        "24,32,32",
        "--edges",
        "16",
        "--no-pgps",
        "--no-daemon",
        "--no-cold",
        "--seconds",
        "0.2",
    ]);
    // Through shared memory (the default on the daemon's host) and inside the messages.
    for (transport, name) in [("grpc-shm", "gRPC+shm"), ("grpc", "gRPC")] {
        let report = dir.path().join(format!("load-{transport}.json"));
        let out = run_ok(&[
            "bench",
            "load",
            "--store",
            s(&work.join("store")),
            "--streams",
            "6",
            "--duration",
            "2",
            "--sizes",
            "8,16,16;16,16,16;16,32,32",
            "--switch-every",
            "2",
            "--workers",
            "2",
            "--cache-mb",
            "16",
            "--transport",
            transport,
            "--shm-mb",
            "64",
            "--json",
            s(&report),
            "--log",
            s(&dir.path().join("daemon.log")),
        ]);
        assert!(out.contains("errors: 0"), "{out}");
        assert!(out.contains(&format!("6 streams over {name},")), "{out}");
        let r = json(&report);
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["streams"], 6);
        assert_eq!(r["transport"], name);
        assert!(r["batches"].as_u64().unwrap() >= 6, "{r}");
        assert!(r["size_changes"].as_u64().unwrap() >= 1, "{r}");
        assert!(r["within_bound"].as_bool().unwrap(), "{r}");
        assert!(r["daemon_peak_rss_bytes"].as_u64().unwrap() > 0);
        assert!(r["latency_p99_ms"].as_f64().unwrap() >= r["latency_p50_ms"].as_f64().unwrap());
        let shared = r["daemon_peak_shared_bytes"].as_u64().unwrap();
        if transport == "grpc-shm" {
            // The slot files were there while the streams ran, within the cap given.
            assert!(shared > 0, "{r}");
            assert_eq!(r["shared_memory_cap_bytes"], 64 << 20);
            assert!(out.contains("shared-memory slots"), "{out}");
        } else {
            assert_eq!(shared, 0, "{r}");
            assert_eq!(r["shared_memory_cap_bytes"], 0);
        }
    }
}
