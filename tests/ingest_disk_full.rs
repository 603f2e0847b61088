//! The disk fills up during ingest: the failing cases are reported with the system's error, no
//! partial case file is left or listed, and a rerun with space completes the store.
//!
//! The store lives on a small tmpfs mounted in a private mount namespace (`unshare -rm`, so no
//! privileges are needed and nothing outside the test sees it). Where user namespaces are not
//! available the test falls back to a file-size limit (`ulimit -f`), which fails the writes
//! with EFBIG instead of ENOSPC through the same code path.

mod common;

use std::process::Command;

use common::{run_ok, s};

fn sh(script: &str, namespace: bool) -> (bool, String) {
    let mut cmd = if namespace {
        let mut c = Command::new("unshare");
        c.args(["-rm", "sh", "-c", script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    };
    let out = cmd.output().expect("sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn disk_full_during_ingest_leaves_no_partial_case_and_a_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    run_ok(&["phantom", s(&raw), "--cases", "4", "--shape", "48,64,64"]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let exe = env!("CARGO_BIN_EXE_patchflow");
    let store = mnt.join("store");
    let namespace = Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|st| st.success());
    // Phase 1 fills the disk; phase 2 makes room and reruns; the listing and the manifest are
    // printed between markers for the checks below.
    let (limit, grow) = if namespace {
        (
            format!(
                "mount -t tmpfs -o size=700k tmpfs {m} || exit 97",
                m = s(&mnt)
            ),
            format!("mount -o remount,size=16m {m}", m = s(&mnt)),
        )
    } else {
        eprintln!("user namespaces unavailable: limiting file sizes instead of filling a disk");
        (
            "trap '' XFSZ; ulimit -S -f 200".to_owned(),
            "ulimit -S -f unlimited".to_owned(),
        )
    };
    let script = format!(
        "{limit}
         {exe} --quiet ingest {raw} --out {store}; echo \"FIRST_RC=$?\"
         echo '--- listing'; ls -a {store}; echo '--- manifest'; cat {store}/manifest.json; echo '--- end'
         {grow}
         {exe} --quiet ingest {raw} --out {store}; echo \"SECOND_RC=$?\"
         {exe} --quiet inspect {store} --verify; echo \"VERIFY_RC=$?\"
         {exe} --quiet inspect {store} --json > {json}",
        raw = s(&raw),
        store = s(&store),
        json = s(&dir.path().join("inspect.json")),
    );
    let (ok, out) = sh(&script, namespace);
    assert!(ok, "{out}");
    assert!(!out.contains("exit 97"), "{out}");

    // Phase 1: some cases fail with a clear error naming the case and the system's reason.
    assert!(
        out.contains("FIRST_RC=1"),
        "ingest must fail when the disk is full:\n{out}"
    );
    let reason = if namespace {
        "No space left on device"
    } else {
        "File too large"
    };
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("failed: phantom_"))
        .collect();
    assert!(!failed.is_empty(), "{out}");
    for line in &failed {
        assert!(line.contains(reason), "{line}");
    }
    // Nothing partial: no temporary file is left, and the manifest lists exactly the case
    // files that exist.
    let listing = section(&out, "--- listing", "--- manifest");
    assert!(
        !listing.contains(".tmp"),
        "temporary file left behind:\n{listing}"
    );
    let files: Vec<&str> = listing.lines().filter(|l| l.ends_with(".pfc")).collect();
    assert!(files.len() < 4, "{listing}");
    let manifest: serde_json::Value =
        serde_json::from_str(section(&out, "--- manifest", "--- end")).expect("manifest parses");
    let mut listed: Vec<String> = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["file"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut present: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    present.sort();
    assert_eq!(listed, present, "{out}");
    assert_eq!(failed.len() + present.len(), 4, "{out}");

    // Phase 2: the rerun completes and every chunk verifies.
    assert!(out.contains("SECOND_RC=0"), "{out}");
    assert!(out.contains("VERIFY_RC=0"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("inspect.json")).unwrap())
            .unwrap();
    assert_eq!(report["cases"].as_array().unwrap().len(), 4, "{report}");
}

fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let a = text.find(start).expect("start marker") + start.len();
    let b = text[a..].find(end).expect("end marker") + a;
    text[a..b].trim()
}
