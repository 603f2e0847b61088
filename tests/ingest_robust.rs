//! Ingest end to end on generated data: bad inputs next to good ones, a kill in the middle of a
//! write, re-runs, and the watch daemon; and the logs of the binary when they go to a file.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{inspect_json, patchflow, run, run_ok, s};
use patchflow_store::{CaseReader, ChunkCache, Manifest};
use patchflow_volume::{Geometry, LabelData, PhantomSpec, VoxelData, phantom, write_nifti};

fn small_spec(seed: u64) -> PhantomSpec {
    PhantomSpec {
        shape: [20, 32, 32],
        spacing: [2.0, 1.0, 1.0],
        seed,
        lesions: 2,
    }
}

fn write_pair(dir: &Path, name: &str, seed: u64) -> (Geometry, VoxelData, LabelData) {
    let (g, img, lab) = phantom(&small_spec(seed));
    write_nifti(&dir.join(format!("{name}.nii.gz")), &g, &img).unwrap();
    write_nifti(
        &dir.join(format!("{name}_seg.nii.gz")),
        &g,
        &lab.clone().into_voxels(),
    )
    .unwrap();
    (g, img, lab)
}

/// Waits until `cond` holds, checking every few milliseconds, for at most `limit`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bad_inputs_fail_alone_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (g, _, lab) = write_pair(d, "good", 1);
    // Truncated gzip.
    write_pair(d, "trunc", 2);
    let bytes = std::fs::read(d.join("trunc.nii.gz")).unwrap();
    std::fs::write(d.join("trunc.nii.gz"), &bytes[..bytes.len() / 2]).unwrap();
    // Not NIfTI at all.
    std::fs::write(d.join("text.nii.gz"), b"this is not an image").unwrap();
    std::fs::copy(d.join("good_seg.nii.gz"), d.join("text_seg.nii.gz")).unwrap();
    // NaN in the image.
    let n = g.voxels();
    let mut f = vec![1.0f32; n];
    f[n / 2] = f32::NAN;
    write_nifti(&d.join("nan.nii.gz"), &g, &VoxelData::F32(f)).unwrap();
    std::fs::copy(d.join("good_seg.nii.gz"), d.join("nan_seg.nii.gz")).unwrap();
    // Label on another grid.
    let mut g2 = g.clone();
    g2.shape = [g.shape[0], g.shape[1], g.shape[2] - 1];
    let LabelData::U8(l) = &lab else { panic!() };
    write_nifti(
        &d.join("grid_seg.nii.gz"),
        &g2,
        &VoxelData::U8(l[..g2.voxels()].to_vec()),
    )
    .unwrap();
    std::fs::copy(d.join("good.nii.gz"), d.join("grid.nii.gz")).unwrap();
    // Non-integer label.
    let mut lf = vec![0.0f32; n];
    lf[7] = 1.5;
    write_nifti(&d.join("frac_seg.nii.gz"), &g, &VoxelData::F32(lf)).unwrap();
    std::fs::copy(d.join("good.nii.gz"), d.join("frac.nii.gz")).unwrap();
    // No foreground: allowed, with a warning.
    write_nifti(&d.join("empty_seg.nii.gz"), &g, &VoxelData::U8(vec![0; n])).unwrap();
    std::fs::copy(d.join("good.nii.gz"), d.join("empty.nii.gz")).unwrap();
    let mut tsv = String::from("image\tlabel\tmodality\n");
    for name in ["good", "trunc", "text", "nan", "grid", "frac", "empty"] {
        tsv.push_str(&format!("{name}.nii.gz\t{name}_seg.nii.gz\tCT\n"));
    }
    tsv.push_str("good.nii.gz\tmissing_seg.nii.gz\tCT\n");
    std::fs::write(d.join("cases.tsv"), tsv).unwrap();

    let store = d.join("store");
    let out = patchflow()
        .args([
            "ingest",
            s(&d.join("cases.tsv")),
            "--out",
            s(&store),
            "--jobs",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed case makes the exit code non-zero"
    );
    for (file, reason) in [
        ("trunc.nii.gz", ""),
        ("text.nii.gz", ""),
        ("nan.nii.gz", "NaN"),
        ("grid", "shape"),
        ("frac_seg.nii.gz", "non-integer"),
        ("missing_seg.nii.gz", "missing label"),
    ] {
        let line = stderr
            .lines()
            .find(|l| l.starts_with("failed:") && l.contains(file))
            .unwrap_or_else(|| panic!("no failure line naming {file} in:\n{stderr}"));
        assert!(line.contains(reason), "{file}: {line}");
    }
    assert!(stderr.contains("no foreground"), "{stderr}");
    assert!(
        stderr.contains("2 ingested") && stderr.contains("6 failed"),
        "{stderr}"
    );
    let report = inspect_json(&store);
    let ids: Vec<&str> = report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["empty", "good"]);
}

#[test]
fn rerun_skips_unchanged_and_redoes_changed_cases() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let store = dir.path().join("store");
    run_ok(&["phantom", s(&raw), "--cases", "3", "--shape", "16,24,24"]);
    run_ok(&["ingest", s(&raw), "--out", s(&store)]);
    let out = run(&["ingest", s(&raw), "--out", s(&store)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(stderr.contains("0 ingested, 3 unchanged"), "{stderr}");
    // Change one case's label: only that case is redone.
    let label = raw.join("labelsTr/phantom_001.nii.gz");
    let other = raw.join("labelsTr/phantom_002.nii.gz");
    std::fs::copy(&other, &label).unwrap();
    let out = run(&["ingest", s(&raw), "--out", s(&store)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 ingested, 2 unchanged"), "{stderr}");
}

/// Every case file present opens and passes verification; the manifest lists only such files.
fn assert_store_consistent(store: &Path) -> usize {
    let cache = ChunkCache::new(1 << 20);
    let mut readable = 0;
    for entry in std::fs::read_dir(store).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".pfc") && !name.starts_with('.') {
            let reader = CaseReader::open(&entry.path(), cache.clone())
                .unwrap_or_else(|e| panic!("{name} is visible but unreadable: {e}"));
            reader.verify().unwrap();
            readable += 1;
        }
    }
    if let Some(m) = Manifest::load(store).unwrap() {
        for c in &m.cases {
            assert!(
                store.join(&c.file).is_file(),
                "manifest lists {} but it is missing",
                c.file
            );
        }
    }
    readable
}

#[test]
fn killing_ingest_mid_write_leaves_no_partial_case() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let store = dir.path().join("store");
    run_ok(&["phantom", s(&raw), "--cases", "3", "--shape", "96,192,192"]);
    let mut child = patchflow()
        .args([
            "ingest",
            s(&raw),
            "--out",
            s(&store),
            "--jobs",
            "1",
            "--keep-spacing",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the moment a case is being written (its temporary file exists).
    let writing = || {
        std::fs::read_dir(&store).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains(".tmp."))
        })
    };
    let start = Instant::now();
    let mut caught = false;
    while start.elapsed() < Duration::from_secs(120) {
        if writing() {
            caught = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::yield_now();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        caught,
        "ingest finished before a write could be interrupted"
    );
    let before = assert_store_consistent(&store);
    assert!(before < 3, "the kill happened during the writes");
    // A rerun completes the store and cleans up.
    run_ok(&[
        "ingest",
        s(&raw),
        "--out",
        s(&store),
        "--jobs",
        "1",
        "--keep-spacing",
    ]);
    assert_eq!(assert_store_consistent(&store), 3);
    let leftovers: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert_eq!(inspect_json(&store)["total"]["cases"], 3);
}

#[test]
fn watch_ingests_new_cases_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let more = dir.path().join("more");
    let store = dir.path().join("store");
    run_ok(&["phantom", s(&raw), "--cases", "1", "--shape", "16,24,24"]);
    run_ok(&[
        "phantom",
        s(&more),
        "--cases",
        "2",
        "--shape",
        "16,24,24",
        "--seed",
        "99",
    ]);
    let mut child = patchflow()
        .args([
            "ingest",
            s(&raw),
            "--out",
            s(&store),
            "--watch",
            "--poll-seconds",
            "0.05",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cases = || {
        Manifest::load(&store)
            .ok()
            .flatten()
            .map_or(0, |m| m.cases.len())
    };
    wait_for(Duration::from_secs(60), "the first case", || cases() == 1);
    // A new case arrives: label first, then the image, each renamed into place.
    for (from, to) in [
        ("labelsTr/phantom_001.nii.gz", "labelsTr/late.nii.gz"),
        (
            "imagesTr/phantom_001_0000.nii.gz",
            "imagesTr/late_0000.nii.gz",
        ),
    ] {
        std::fs::rename(more.join(from), raw.join(to)).unwrap();
    }
    wait_for(Duration::from_secs(60), "the new case", || cases() == 2);
    let ids: Vec<String> = Manifest::load(&store)
        .unwrap()
        .unwrap()
        .cases
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["late", "phantom_000"]);
    // SAFETY: sending a signal to our own child process by its pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "watch exits cleanly on SIGTERM: {status}");
    assert_eq!(assert_store_consistent(&store), 2);
}

#[test]
fn a_flipped_byte_in_a_chunk_is_a_checksum_error_naming_case_and_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let store = dir.path().join("store");
    run_ok(&["phantom", s(&raw), "--cases", "2", "--shape", "32,48,48"]);
    run_ok(&["ingest", s(&raw), "--out", s(&store), "--keep-spacing"]);
    run_ok(&["inspect", s(&store), "--verify"]);
    // Chunk payloads lie between the 128-byte preamble and the chunk index (FORMAT.md); the
    // index offset is the u64 at byte 40 of the preamble.
    let file = store.join("phantom_001.pfc");
    let mut bytes = std::fs::read(&file).unwrap();
    let index_offset = u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let target = 128 + (index_offset - 128) / 3;
    bytes[target] ^= 0x5a;
    std::fs::write(&file, &bytes).unwrap();
    let out = run(&["inspect", s(&store), "--verify"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged store fails verification");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("damaged: phantom_001"))
        .unwrap_or_else(|| panic!("no damage report for phantom_001 in:\n{stderr}"));
    assert!(
        line.contains("checksum") && line.contains("chunk"),
        "{line}"
    );
    assert!(!stderr.contains("damaged: phantom_000"), "{stderr}");
}

/// Logs that go to a pipe or a file are plain text: no ANSI colour codes.
#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    // Without --quiet, so that the info lines are written; stderr is a pipe here.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patchflow"))
        .args(["phantom", s(&raw), "--cases", "1", "--shape", "8x16x16"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("INFO") && stderr.contains("wrote phantom dataset"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "escape codes in {stderr:?}");
}
