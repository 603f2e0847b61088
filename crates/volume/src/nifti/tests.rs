use super::*;
use crate::label::{check_same_grid, read_label};
use proptest::prelude::*;

/// A rotated, anisotropic LPS-like grid whose affine is exactly representable in `f32`.
fn rotated_geometry(shape: [usize; 3]) -> Geometry {
    // Rotation by 90° about z combined with a flip, times spacing (x 0.75, y 1.5, z 3).
    Geometry {
        shape,
        spacing: [3.0, 1.5, 0.75],
        affine: [
            [0.0, -1.5, 0.0, 12.5],
            [-0.75, 0.0, 0.0, -30.25],
            [0.0, 0.0, 3.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    }
}

fn ramp_data(dtype: DType, n: usize) -> VoxelData {
    let f = |i: usize| (i % 97) as f64 - 20.0;
    match dtype {
        DType::U8 => VoxelData::U8((0..n).map(|i| (i % 251) as u8).collect()),
        DType::I8 => VoxelData::I8((0..n).map(|i| f(i) as i8).collect()),
        DType::U16 => VoxelData::U16((0..n).map(|i| (i * 37 % 65_000) as u16).collect()),
        DType::I16 => VoxelData::I16((0..n).map(|i| (f(i) * 300.0) as i16).collect()),
        DType::U32 => VoxelData::U32(
            (0..n)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761))
                .collect(),
        ),
        DType::I32 => VoxelData::I32((0..n).map(|i| (i as i32 - 50) * 1_000_003).collect()),
        DType::F32 => VoxelData::F32((0..n).map(|i| f(i) as f32 * 0.37).collect()),
        DType::F64 => VoxelData::F64((0..n).map(|i| f(i) * 1.0e-3 + 1.0e200).collect()),
    }
}

const ALL_DTYPES: [DType; 8] = [
    DType::U8,
    DType::I8,
    DType::U16,
    DType::I16,
    DType::U32,
    DType::I32,
    DType::F32,
    DType::F64,
];

/// Writes a small valid `.nii` and returns its bytes for patching.
fn valid_bytes(dir: &Path, dtype: DType) -> Vec<u8> {
    let path = dir.join("base.nii");
    let g = rotated_geometry([2, 3, 4]);
    write_nifti(&path, &g, &ramp_data(dtype, 24)).unwrap();
    std::fs::read(&path).unwrap()
}

fn put_i16(bytes: &mut [u8], offset: usize, v: i16) {
    bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_f32(bytes: &mut [u8], offset: usize, v: f32) {
    bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn round_trip_every_dtype_plain_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let g = rotated_geometry([5, 6, 7]);
    for dtype in ALL_DTYPES {
        for ext in ["nii", "nii.gz"] {
            let path = dir.path().join(format!("img_{dtype}.{ext}"));
            let data = ramp_data(dtype, g.voxels());
            write_nifti(&path, &g, &data).unwrap();
            let img = read_nifti(&path).unwrap();
            assert_eq!(img.geometry, g, "{dtype} {ext}");
            assert_eq!(img.data, data, "{dtype} {ext}");
            assert_eq!(img.source_dtype, dtype);
            assert_eq!(img.path, path);
            assert_eq!(img.geometry.orientation(), "PLS");
        }
    }
}

#[test]
fn gzip_is_detected_by_content_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let g = rotated_geometry([2, 3, 4]);
    let data = ramp_data(DType::I16, 24);
    let gz = dir.path().join("a.nii.gz");
    write_nifti(&gz, &g, &data).unwrap();
    let renamed = write_file(dir.path(), "b.nii", &std::fs::read(&gz).unwrap());
    assert_eq!(read_nifti(&renamed).unwrap().data, data);
}

#[test]
fn written_header_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_bytes(dir.path(), DType::I16);
    assert_eq!(bytes.len(), 352 + 24 * 2);
    assert!(
        bytes[4..38].iter().all(|&b| b == 0),
        "data_type/db_name empty"
    );
    assert!(
        bytes[148..252].iter().all(|&b| b == 0),
        "descrip/aux_file empty"
    );
    assert!(bytes[328..344].iter().all(|&b| b == 0), "intent_name empty");
    assert_eq!(&bytes[344..348], b"n+1\0");
    assert_eq!(i16::from_le_bytes([bytes[252], bytes[253]]), 1);
    assert_eq!(i16::from_le_bytes([bytes[254], bytes[255]]), 1);
}

#[test]
fn qform_only_gives_the_same_affine() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_bytes(dir.path(), DType::U8);
    put_i16(&mut bytes, 254, 0); // sform_code
    let path = write_file(dir.path(), "q.nii", &bytes);
    let img = read_nifti(&path).unwrap();
    let want = rotated_geometry([2, 3, 4]);
    for r in 0..4 {
        for c in 0..4 {
            assert!(
                (img.geometry.affine[r][c] - want.affine[r][c]).abs() < 1e-5,
                "{:?}",
                img.geometry.affine
            );
        }
    }
    assert_eq!(img.geometry.spacing, want.spacing);
}

#[test]
fn qform_of_oblique_affines_round_trips() {
    // Rotations of 30° about z, 150° about y, and 180° about z (the quaternion edge case);
    // improper affines (qfac = -1) are covered by `qform_only_gives_the_same_affine`.
    let dir = tempfile::tempdir().unwrap();
    let (s, c) = (0.5f64, 3f64.sqrt() / 2.0);
    let rotations = [
        [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]],
        [[-c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, -c]],
        [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]],
    ];
    for (n, rot) in rotations.iter().enumerate() {
        let spacing = [2.5, 0.8, 1.2];
        let mut affine = [[0.0; 4]; 4];
        for r in 0..3 {
            for col in 0..3 {
                affine[r][col] = rot[r][col] * spacing[2 - col];
            }
            affine[r][3] = [10.0, -4.0, 2.0][r];
        }
        affine[3][3] = 1.0;
        let g = Geometry {
            shape: [2, 2, 2],
            spacing,
            affine,
        };
        let path = dir.path().join(format!("o{n}.nii"));
        write_nifti(&path, &g, &VoxelData::U8(vec![1; 8])).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        put_i16(&mut bytes, 254, 0);
        std::fs::write(&path, bytes).unwrap();
        let read = read_nifti(&path).unwrap().geometry;
        for r in 0..3 {
            for col in 0..4 {
                assert!(
                    (read.affine[r][col] - g.affine[r][col]).abs() < 1e-5,
                    "rotation {n}: {:?} vs {:?}",
                    read.affine,
                    g.affine
                );
            }
        }
    }
}

#[test]
fn no_transform_codes_give_diagonal_pixdim() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_bytes(dir.path(), DType::U8);
    put_i16(&mut bytes, 252, 0);
    put_i16(&mut bytes, 254, 0);
    let path = write_file(dir.path(), "d.nii", &bytes);
    let g = read_nifti(&path).unwrap().geometry;
    assert_eq!(
        g.affine,
        [
            [0.75, 0.0, 0.0, 0.0],
            [0.0, 1.5, 0.0, 0.0],
            [0.0, 0.0, 3.0, 0.0],
            [0.0, 0.0, 0.0, 1.0]
        ]
    );
    assert_eq!(g.spacing, [3.0, 1.5, 0.75]);
}

#[test]
fn scaling_slope_and_intercept_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_bytes(dir.path(), DType::I16);
    put_f32(&mut bytes, 112, 0.5);
    put_f32(&mut bytes, 116, -1024.0);
    let path = write_file(dir.path(), "s.nii", &bytes);
    let img = read_nifti(&path).unwrap();
    assert_eq!(img.source_dtype, DType::I16);
    let VoxelData::I16(raw) = ramp_data(DType::I16, 24) else {
        unreachable!()
    };
    let want: Vec<f32> = raw.iter().map(|&x| f32::from(x) * 0.5 - 1024.0).collect();
    assert_eq!(img.data, VoxelData::F32(want));

    // f64 sources stay f64.
    let mut bytes = valid_bytes(dir.path(), DType::F64);
    put_f32(&mut bytes, 112, 2.0);
    let path = write_file(dir.path(), "s64.nii", &bytes);
    let img = read_nifti(&path).unwrap();
    let VoxelData::F64(raw) = ramp_data(DType::F64, 24) else {
        unreachable!()
    };
    assert_eq!(
        img.data,
        VoxelData::F64(raw.iter().map(|x| x * 2.0).collect())
    );

    // Slope 0 or NaN (unset) and the identity leave the data alone.
    for (slope, inter) in [
        (0.0, 0.0),
        (1.0, 0.0),
        (0.0, 5.0),
        (f32::NAN, f32::NAN),
        (1.0, f32::NAN),
    ] {
        let mut bytes = valid_bytes(dir.path(), DType::U16);
        put_f32(&mut bytes, 112, slope);
        put_f32(&mut bytes, 116, inter);
        let path = write_file(dir.path(), "id.nii", &bytes);
        assert_eq!(read_nifti(&path).unwrap().data, ramp_data(DType::U16, 24));
    }
}

/// Numeric header fields as `(offset, size)`, for building a big-endian file.
const HEADER_FIELDS: &[(usize, usize, usize)] = &[
    // (offset, element size, count)
    (0, 4, 1),
    (32, 4, 1),
    (36, 2, 1),
    (40, 2, 8),
    (56, 4, 3),
    (68, 2, 4),
    (76, 4, 8),
    (108, 4, 3),
    (120, 2, 1),
    (124, 4, 6),
    (252, 2, 2),
    (256, 4, 18),
];

#[test]
fn big_endian_files_are_swapped() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in ALL_DTYPES {
        let mut bytes = valid_bytes(dir.path(), dtype);
        for &(offset, size, count) in HEADER_FIELDS {
            for k in 0..count {
                bytes[offset + k * size..offset + (k + 1) * size].reverse();
            }
        }
        for c in bytes[352..].chunks_exact_mut(dtype.size()) {
            c.reverse();
        }
        let path = write_file(dir.path(), "be.nii", &bytes);
        let img = read_nifti(&path).unwrap();
        assert_eq!(img.data, ramp_data(dtype, 24), "{dtype}");
        assert_eq!(img.geometry, rotated_geometry([2, 3, 4]));
    }
}

#[test]
fn four_and_five_d_with_one_volume_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    for ndim in [4i16, 5] {
        let mut bytes = valid_bytes(dir.path(), DType::I16);
        put_i16(&mut bytes, 40, ndim);
        let path = write_file(dir.path(), "one.nii", &bytes);
        let img = read_nifti(&path).unwrap();
        assert_eq!(img.geometry.shape, [2, 3, 4]);
    }
}

#[test]
fn multi_volume_image_is_rejected_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_bytes(dir.path(), DType::I16);
    put_i16(&mut bytes, 40, 4);
    put_i16(&mut bytes, 48, 3);
    bytes.extend(vec![0u8; 2 * 24 * 2]);
    let path = write_file(dir.path(), "multi.nii", &bytes);
    let err = read_nifti(&path).unwrap_err();
    assert!(
        matches!(err, VolumeError::MultiVolume { volumes: 3, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("multi.nii") && msg.contains("_0000, _0001"),
        "{msg}"
    );
    // The same with a 5D vector image.
    put_i16(&mut bytes, 40, 5);
    put_i16(&mut bytes, 48, 1);
    put_i16(&mut bytes, 50, 3);
    let path = write_file(dir.path(), "multi5.nii", &bytes);
    assert!(matches!(
        read_nifti(&path),
        Err(VolumeError::MultiVolume { volumes: 3, .. })
    ));
}

#[test]
fn two_d_image_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_bytes(dir.path(), DType::U8);
    put_i16(&mut bytes, 40, 2);
    let path = write_file(dir.path(), "flat.nii", &bytes);
    let err = read_nifti(&path).unwrap_err();
    assert!(
        matches!(err, VolumeError::NotThreeD { ndim: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("flat.nii: 2D image"), "{err}");
}

#[test]
fn unsupported_datatypes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (code, name) in [
        (128i16, "RGB24"),
        (1024, "int64"),
        (32, "complex64"),
        (99, "unknown"),
    ] {
        let mut bytes = valid_bytes(dir.path(), DType::U8);
        put_i16(&mut bytes, 70, code);
        let path = write_file(dir.path(), "odd.nii", &bytes);
        let err = read_nifti(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, VolumeError::UnsupportedDatatype { .. }),
            "{msg}"
        );
        assert!(msg.contains(name) && msg.contains("odd.nii"), "{msg}");
    }
}

#[test]
fn nan_and_inf_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.nii.gz");
    let mut v = vec![1.0f32; 24];
    v[5] = f32::NAN;
    v[17] = f32::INFINITY;
    v[18] = f32::NAN;
    write_nifti(&path, &rotated_geometry([2, 3, 4]), &VoxelData::F32(v)).unwrap();
    let err = read_nifti(&path).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::NonFinite {
                count: 3,
                first: [0, 1, 1],
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("3 NaN/Inf"), "{err}");
}

#[test]
fn truncated_gzip_is_a_gzip_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.nii.gz");
    let g = rotated_geometry([8, 16, 16]);
    write_nifti(&path, &g, &ramp_data(DType::F32, g.voxels())).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 4, 30] {
        let p = write_file(dir.path(), "cut.nii.gz", &bytes[..cut]);
        let err = read_nifti(&p).unwrap_err();
        assert!(
            matches!(err, VolumeError::Gzip { .. }),
            "cut at {cut}: {err}"
        );
        assert!(err.to_string().contains("cut.nii.gz"), "{err}");
    }
    // Corrupt deflate data in the middle.
    let mut bad = bytes.clone();
    for b in &mut bad[40..80] {
        *b ^= 0x5a;
    }
    let p = write_file(dir.path(), "bad.nii.gz", &bad);
    assert!(matches!(read_nifti(&p), Err(VolumeError::Gzip { .. })));
}

#[test]
fn short_data_is_reported_with_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_bytes(dir.path(), DType::I16);
    let short = &bytes[..bytes.len() - 10];
    let p = write_file(dir.path(), "short.nii", short);
    let err = read_nifti(&p).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::TruncatedData {
                expected: 48,
                actual: 38,
                offset: 352,
                ..
            }
        ),
        "{err}"
    );
    // A complete gzip stream of a short file is a data error, not a gzip error.
    let p = write_file(dir.path(), "short.nii.gz", &gzip(short));
    let err = read_nifti(&p).unwrap_err();
    assert!(
        matches!(err, VolumeError::TruncatedData { actual: 38, .. }),
        "{err}"
    );
    // A header announcing far more than the file can hold (but within the voxel limit).
    let mut huge = bytes.clone();
    for k in 0..3 {
        put_i16(&mut huge, 42 + 2 * k, 1_000);
    }
    let p = write_file(dir.path(), "huge.nii.gz", &gzip(&huge));
    assert!(matches!(
        read_nifti(&p),
        Err(VolumeError::TruncatedData { actual: 48, .. })
    ));
}

#[test]
fn random_bytes_are_not_nifti() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x1234_5678_u64;
    let noise: Vec<u8> = (0..2000)
        .map(|_| {
            state = crate::locations::splitmix64(state);
            state as u8
        })
        .collect();
    for name in ["r.nii", "r.nii.gz"] {
        let p = write_file(dir.path(), name, &noise);
        let err = read_nifti(&p).unwrap_err();
        assert!(matches!(err, VolumeError::NotNifti { .. }), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    let p = write_file(dir.path(), "r2.nii.gz", &noise);
    assert!(read_nifti(&p).unwrap_err().to_string().contains("not gzip"));
    let p = write_file(dir.path(), "empty.nii", &[]);
    assert!(matches!(read_nifti(&p), Err(VolumeError::NotNifti { .. })));
    // Random bytes behind a gzip magic.
    let mut fake = vec![0x1f, 0x8b, 8, 0];
    fake.extend_from_slice(&noise);
    let p = write_file(dir.path(), "fake.nii.gz", &fake);
    assert!(matches!(read_nifti(&p), Err(VolumeError::Gzip { .. })));
    // A gzipped text file.
    let p = write_file(
        dir.path(),
        "text.nii.gz",
        &gzip(b"hello, this is not an image"),
    );
    assert!(matches!(read_nifti(&p), Err(VolumeError::NotNifti { .. })));
    // A missing file.
    let err = read_nifti(&dir.path().join("missing.nii")).unwrap_err();
    assert!(matches!(err, VolumeError::Io { .. }), "{err}");
}

#[test]
fn wrong_magic_and_header_only_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_bytes(dir.path(), DType::U8);
    bytes[344..348].copy_from_slice(b"ni1\0");
    let p = write_file(dir.path(), "pair.nii", &bytes);
    assert!(
        read_nifti(&p)
            .unwrap_err()
            .to_string()
            .contains(".hdr/.img")
    );
    bytes[344..348].copy_from_slice(b"abcd");
    let p = write_file(dir.path(), "magic.nii", &bytes);
    assert!(read_nifti(&p).unwrap_err().to_string().contains("magic"));
}

#[test]
fn nifti2_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let mut header = vec![0u8; 540 + 4 + 8];
    header[0..4].copy_from_slice(&540i32.to_le_bytes());
    header[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
    for (name, bytes) in [("n2.nii", header.clone()), ("n2.nii.gz", gzip(&header))] {
        let p = write_file(dir.path(), name, &bytes);
        let err = read_nifti(&p).unwrap_err();
        assert!(matches!(err, VolumeError::Nifti2 { .. }), "{err}");
        assert!(err.to_string().contains("NIfTI-2"), "{err}");
    }
    // Big-endian NIfTI-2.
    header[0..4].copy_from_slice(&540i32.to_be_bytes());
    let p = write_file(dir.path(), "n2be.nii", &header);
    assert!(matches!(read_nifti(&p), Err(VolumeError::Nifti2 { .. })));
}

#[test]
fn bad_header_values_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    type Patch = fn(&mut Vec<u8>);
    let cases: [(&str, Patch); 4] = [
        ("dim", |b| put_i16(b, 44, -3)),
        ("dim", |b| put_i16(b, 42, 0)),
        ("vox_offset", |b| put_f32(b, 108, 12.0)),
        ("srow", |b| put_f32(b, 280, f32::NAN)),
    ];
    for (field, patch) in cases {
        let mut bytes = valid_bytes(dir.path(), DType::U8);
        patch(&mut bytes);
        let p = write_file(dir.path(), "bad.nii", &bytes);
        let err = read_nifti(&p).unwrap_err();
        assert!(
            matches!(&err, VolumeError::BadHeader { field: f, .. } if *f == field),
            "{field}: {err}"
        );
    }
}

#[test]
fn writer_rejects_inconsistent_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.nii");
    let g = rotated_geometry([2, 3, 4]);
    assert!(matches!(
        write_nifti(&p, &g, &VoxelData::U8(vec![0; 23])),
        Err(VolumeError::InvalidVolume { .. })
    ));
    let mut bad = g.clone();
    bad.spacing[0] = 0.0;
    assert!(write_nifti(&p, &bad, &VoxelData::U8(vec![0; 24])).is_err());
    let mut big = g.clone();
    big.shape = [1, 1, 40_000];
    assert!(write_nifti(&p, &big, &VoxelData::U8(vec![0; 40_000])).is_err());
    let missing_dir = dir.path().join("no/such/dir/w.nii");
    assert!(matches!(
        write_nifti(&missing_dir, &g, &VoxelData::U8(vec![0; 24])),
        Err(VolumeError::Write { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the header says, reading returns an error or a consistent image, never panics.
    #[test]
    fn corrupted_headers_never_panic(
        patches in proptest::collection::vec((0usize..352, any::<u8>()), 1..12),
        gz in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_bytes(dir.path(), DType::I16);
        for (offset, value) in patches {
            bytes[offset] = value;
        }
        let bytes = if gz { gzip(&bytes) } else { bytes };
        let p = write_file(dir.path(), "fuzz.nii", &bytes);
        if let Ok(img) = read_nifti(&p) {
            prop_assert_eq!(img.data.len(), img.geometry.voxels());
        }
        let _ = read_label(&p);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(dir.path(), "any.nii", &bytes);
        prop_assert!(read_nifti(&p).is_err());
    }
}

/// Root of the shared real-data folder, or `None` (with a message) when it is absent.
pub(crate) fn shared_data() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if dir.join("pairs.tsv").is_file() {
        Some(dir)
    } else {
        eprintln!("skipping: real data folder {} not found", dir.display());
        None
    }
}

/// What the `what` column of pairs.tsv says about an image.
#[derive(Debug)]
struct Described {
    shape_xyz: [usize; 3],
    dtype: DType,
    orientation: String,
    spacing_xyz: [f64; 3],
}

fn parse_description(what: &str) -> Described {
    let tokens: Vec<&str> = what
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect();
    let triple = |t: &str| -> Option<Vec<f64>> {
        let parts: Vec<f64> = t
            .split('x')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        (parts.len() == 3).then_some(parts)
    };
    let shape = tokens
        .iter()
        .find_map(|t| triple(t).filter(|p| p.iter().all(|v| v.fract() == 0.0) && !t.contains('.')));
    let shape = shape.expect("shape in description");
    let dtype = tokens
        .iter()
        .find_map(|t| match *t {
            "int16" => Some(DType::I16),
            "int32" => Some(DType::I32),
            "uint8" => Some(DType::U8),
            _ => None,
        })
        .expect("dtype in description");
    let orientation = tokens
        .iter()
        .find(|t| t.len() == 3 && t.chars().all(|c| "RLAPSI".contains(c)))
        .map(|t| t.to_string())
        .unwrap_or_else(|| "RAS".into());
    let mm = tokens
        .iter()
        .position(|t| *t == "mm")
        .expect("spacing in description");
    let s = tokens[mm - 1];
    let spacing = match triple(s) {
        Some(v) => [v[0], v[1], v[2]],
        None => {
            let v: f64 = s.parse().expect("spacing value");
            [v; 3]
        }
    };
    Described {
        shape_xyz: [shape[0] as usize, shape[1] as usize, shape[2] as usize],
        dtype,
        orientation,
        spacing_xyz: spacing,
    }
}

#[test]
fn real_pairs_read_as_described() {
    let Some(root) = shared_data() else { return };
    let table = std::fs::read_to_string(root.join("pairs.tsv")).unwrap();
    let mut seen = 0;
    for line in table.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 4, "{line}");
        let desc = parse_description(cols[3]);
        let image_path = root.join(cols[0]);
        let label_path = root.join(cols[1]);
        let img = read_nifti(&image_path).unwrap();
        let [x, y, z] = desc.shape_xyz;
        assert_eq!(img.geometry.shape, [z, y, x], "{}", cols[0]);
        assert_eq!(img.source_dtype, desc.dtype, "{}", cols[0]);
        assert_eq!(img.data.dtype(), desc.dtype, "{}", cols[0]);
        assert_eq!(img.geometry.orientation(), desc.orientation, "{}", cols[0]);
        let [sx, sy, sz] = desc.spacing_xyz;
        for (got, want) in img.geometry.spacing.iter().zip([sz, sy, sx]) {
            assert!(
                (got - want).abs() < 0.01 * want,
                "{}: {:?}",
                cols[0],
                img.geometry.spacing
            );
        }
        let (label_geometry, label) = read_label(&label_path).unwrap();
        assert_eq!(label.len(), img.geometry.voxels());
        assert!(
            label.as_bytes().iter().any(|&b| b != 0),
            "{} has foreground",
            cols[1]
        );
        check_same_grid(&img.geometry, &label_geometry, &image_path, &label_path).unwrap();
        seen += 1;
    }
    assert_eq!(seen, 9);
}

#[test]
fn large_volume_reads() {
    let Some(root) = shared_data() else { return };
    let path = root.join("large_unlabeled/ch2better.nii.gz");
    if !path.is_file() {
        eprintln!("skipping: {} not found", path.display());
        return;
    }
    let img = read_nifti(&path).unwrap();
    assert_eq!(img.geometry.shape, [316, 370, 301]);
    assert_eq!(img.data.dtype(), DType::U8);
    assert_eq!(img.data.len(), 301 * 370 * 316);
}

#[test]
fn bytes_read_exactly_like_files() {
    let dir = tempfile::tempdir().unwrap();
    let g = rotated_geometry([3, 4, 5]);
    for dtype in ALL_DTYPES {
        for name in ["m.nii", "m.nii.gz"] {
            let p = dir.path().join(name);
            write_nifti(&p, &g, &ramp_data(dtype, 60)).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(
                read_nifti_bytes(&bytes, &p).unwrap(),
                read_nifti(&p).unwrap(),
                "{dtype} {name}"
            );
        }
    }
    let p = dir.path().join("l.nii.gz");
    write_nifti(&p, &g, &VoxelData::U16((0..60).map(|i| i * 1000).collect())).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (lg, l) = crate::label::read_label_bytes(&bytes, &p).unwrap();
    assert_eq!((lg, l), read_label(&p).unwrap());
    // Errors name the given path, and the same checks apply.
    let name = Path::new("from-memory.nii");
    let err = read_nifti_bytes(&bytes[..100], name).unwrap_err();
    assert!(err.to_string().contains("from-memory.nii"), "{err}");
    let err = crate::label::read_label_bytes(&[], name).unwrap_err();
    assert!(matches!(err, VolumeError::NotNifti { .. }), "{err}");
}

#[test]
fn headers_beyond_the_voxel_limit_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let base = valid_bytes(dir.path(), DType::U8);
    // 32767³ ≈ 2^45 voxels, and 32767 × 32767 × 1024 ≈ 2^40.
    for dims in [[32_767, 32_767, 32_767], [32_767, 32_767, 1024]] {
        let mut bytes = base.clone();
        for (k, d) in dims.iter().enumerate() {
            put_i16(&mut bytes, 42 + 2 * k, *d);
        }
        for data in [bytes.clone(), gzip(&bytes)] {
            let err = read_nifti_bytes(&data, Path::new("huge.nii")).unwrap_err();
            assert!(
                matches!(&err, VolumeError::BadHeader { field: "dim", reason, .. }
                    if reason.contains(&MAX_VOXELS.to_string())),
                "{err}"
            );
        }
        let p = write_file(dir.path(), "huge.nii", &bytes);
        assert!(matches!(
            read_nifti_geometry(&p),
            Err(VolumeError::BadHeader { field: "dim", .. })
        ));
    }
    // A shape exactly at the limit passes the header check; only its missing data is refused.
    let mut bytes = base.clone();
    for (k, d) in [4096i16, 1024, 1024].iter().enumerate() {
        put_i16(&mut bytes, 42 + 2 * k, *d);
    }
    let err = read_nifti_bytes(&bytes, Path::new("big.nii")).unwrap_err();
    assert!(
        matches!(err, VolumeError::TruncatedData { actual: 24, .. }),
        "{err}"
    );
}

#[test]
fn gzip_streams_shorter_than_announced_report_what_they_hold() {
    // 40 MB announced (more than one fill step), 3 MiB of incompressible data present: the
    // gzip file is large enough to pass the deflate-ratio bound, so reading starts and must stop
    // at the data that is there.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_bytes(dir.path(), DType::I16);
    bytes.truncate(352);
    for (k, d) in [200i16, 200, 500].iter().enumerate() {
        put_i16(&mut bytes, 42 + 2 * k, *d);
    }
    let mut state = 99u64;
    let present = 3usize << 20;
    bytes.extend((0..present).map(|_| {
        state = crate::locations::splitmix64(state);
        state as u8
    }));
    let err = read_nifti_bytes(&gzip(&bytes), Path::new("short.nii.gz")).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::TruncatedData { expected: 40_000_000, actual, .. } if actual == present
        ),
        "{err}"
    );
}

#[test]
fn volumes_larger_than_one_fill_step_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [17, 1024, 1024];
    let g = rotated_geometry(shape);
    let n = shape.iter().product::<usize>();
    let data = ramp_data(DType::U8, n);
    let p = dir.path().join("big.nii");
    write_nifti(&p, &g, &data).unwrap();
    assert!(n > FILL_STEP_BYTES);
    let img = read_nifti(&p).unwrap();
    assert!(img.data == data);
    // Cut inside the second step: the error counts the bytes of both steps.
    let bytes = std::fs::read(&p).unwrap();
    let cut = &bytes[..bytes.len() - 1000];
    let err = read_nifti_bytes(cut, &p).unwrap_err();
    assert!(
        matches!(err, VolumeError::TruncatedData { actual, .. } if actual == n - 1000),
        "{err}"
    );
}
