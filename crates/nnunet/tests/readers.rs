//! The readers on files written by python-blosc2, numpy and pickle (tests/fixtures, made by
//! `make_fixtures.py` there): every array equals the formula it was written from, bit for bit.

use std::path::{Path, PathBuf};

use patchflow_nnunet::{
    ElemKind, NdArray, NnunetError, decode_b2nd, pickle, read_b2nd, read_npy, read_npz,
    read_properties,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The formulas of make_fixtures.py, by flat C index (see its docstring).
fn f32_at(i: usize) -> f32 {
    ((i * 3) % 1000) as f32 / 8.0
}
fn f64_at(i: usize) -> f64 {
    ((i * 104_729) % 4096) as f64 / 16.0
}
fn u8_at(i: usize) -> u8 {
    ((i * 13) % 5) as u8
}
fn i16_at(shape: &[usize], i: usize) -> i16 {
    let per_axis1: usize = shape[2..].iter().product();
    if (i / per_axis1) % shape[1] < 2 {
        0
    } else {
        ((i * 31) % 11) as i16 - 1
    }
}

fn f32s(a: &NdArray) -> Vec<f32> {
    assert_eq!((a.dtype.kind, a.dtype.size), (ElemKind::Float, 4));
    a.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn check_f32(a: &NdArray, shape: &[usize]) {
    assert_eq!(a.shape, shape);
    let v = f32s(a);
    for (i, x) in v.iter().enumerate() {
        assert_eq!(x.to_bits(), f32_at(i).to_bits(), "element {i}");
    }
}

fn check_i16(a: &NdArray, shape: &[usize]) {
    assert_eq!(a.shape, shape);
    assert_eq!((a.dtype.kind, a.dtype.size), (ElemKind::Int, 2));
    for i in 0..a.len() {
        assert_eq!(
            a.get_i64(i),
            Some(i64::from(i16_at(shape, i))),
            "element {i}"
        );
    }
}

#[test]
fn b2nd_codecs_filters_and_edge_chunks() {
    // nnU-Net's settings (LZ4HC, shuffle, split streams); uneven chunks and padded blocks.
    check_f32(
        &read_b2nd(&fixture("lz4hc_shuffle_f32.b2nd")).unwrap(),
        &[2, 5, 7, 9],
    );
    check_i16(
        &read_b2nd(&fixture("lz4_nofilter_i16.b2nd")).unwrap(),
        &[1, 6, 7, 8],
    );
    check_i16(
        &read_b2nd(&fixture("zstd_bitshuffle_i16.b2nd")).unwrap(),
        &[1, 6, 7, 8],
    );
    check_f32(
        &read_b2nd(&fixture("memcpy_f32.b2nd")).unwrap(),
        &[1, 4, 5, 6],
    );
    check_f32(
        &read_b2nd(&fixture("zstd_truncprec_f32.b2nd")).unwrap(),
        &[2, 5, 6],
    );

    let a = read_b2nd(&fixture("blosclz_delta_shuffle_u8.b2nd")).unwrap();
    assert_eq!(a.shape, [1, 16, 16, 16]);
    assert!(a.data.iter().enumerate().all(|(i, &x)| x == u8_at(i)));

    let a = read_b2nd(&fixture("zlib_f64.b2nd")).unwrap();
    assert_eq!(a.shape, [3, 4, 5]);
    for i in 0..a.len() {
        assert_eq!(a.get_f64(i).to_bits(), f64_at(i).to_bits(), "element {i}");
    }
}

#[test]
fn b2nd_special_chunks() {
    let a = read_b2nd(&fixture("special_zeros_f32.b2nd")).unwrap();
    assert_eq!(a.shape, [2, 6, 6]);
    let v = f32s(&a);
    assert!(
        v[..36].iter().all(|&x| x.to_bits() == 0),
        "chunk 0 is zeros"
    );
    for (i, x) in v[36..].iter().enumerate() {
        assert_eq!(x.to_bits(), f32_at(i).to_bits(), "chunk 1 element {i}");
    }
    let a = read_b2nd(&fixture("special_value_i16.b2nd")).unwrap();
    assert_eq!(a.shape, [3, 4, 5]);
    assert!((0..a.len()).all(|i| a.get_i64(i) == Some(7)));
    let a = read_b2nd(&fixture("special_nan_f64.b2nd")).unwrap();
    assert_eq!(a.shape, [2, 3, 4]);
    assert!((0..a.len()).all(|i| a.get_f64(i).is_nan()));
}

#[test]
fn b2nd_damage_is_an_error_never_a_panic() {
    let path = fixture("zstd_bitshuffle_i16.b2nd");
    let good = std::fs::read(&path).unwrap();
    // Truncation anywhere.
    for cut in (0..good.len()).step_by(7) {
        let r = decode_b2nd(&path, &good[..cut]);
        assert!(r.is_err(), "truncated at {cut} still decoded");
    }
    // Flipped bytes: an error or (where the byte did not matter or only changed values) an
    // array of the right shape; never a panic.
    for at in (0..good.len()).step_by(3) {
        let mut bad = good.clone();
        bad[at] ^= 0x5a;
        if let Ok(a) = decode_b2nd(&path, &bad) {
            assert_eq!(a.shape, [1, 6, 7, 8]);
        }
    }
    let err = decode_b2nd(Path::new("x.b2nd"), b"not a frame at all")
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.b2nd"), "{err}");
}

#[test]
fn npy_and_npz_stored_and_deflated() {
    check_f32(&read_npy(&fixture("c_f32.npy")).unwrap(), &[2, 3, 4]);
    // Big-endian, Fortran order: converted to little-endian C order.
    check_i16(
        &read_npy(&fixture("fortran_be_i16.npy")).unwrap(),
        &[1, 3, 4, 5],
    );
    for name in ["stored.npz", "deflated.npz"] {
        let v = read_npz(&fixture(name), &["data", "seg"]).unwrap();
        check_f32(&v[0], &[2, 3, 4]);
        let seg = &v[1];
        assert_eq!(seg.shape, [1, 3, 4, 4]);
        assert_eq!((seg.dtype.kind, seg.dtype.size), (ElemKind::Int, 1));
        for z in 0..3 {
            for y in 0..4 {
                for x in 0..4 {
                    let i = (z * 4 + y) * 4 + x;
                    let src = (z * 4 + y) * 5 + x;
                    assert_eq!(seg.get_i64(i), Some(i64::from(i16_at(&[1, 3, 4, 5], src))));
                }
            }
        }
        let err = read_npz(&fixture(name), &["nope"]).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("data.npy"), "{err}");
    }
}

#[test]
fn pickled_properties_of_protocols_2_4_and_5() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("props.json")).unwrap()).unwrap();
    for proto in [2, 4, 5] {
        let path = fixture(&format!("props_p{proto}.pkl"));
        let props = read_properties(&path).unwrap();
        assert_eq!(props.spacing, [0.5, 1.0, 2.0], "protocol {proto}");
        assert_eq!(props.shape_before_cropping, [48, 24, 40]);
        assert_eq!(props.bbox_used_for_cropping, [[4, 45], [0, 24], [7, 33]]);
        let locs: serde_json::Value = props
            .class_locations
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        assert_eq!(locs, expected["class_locations"], "protocol {proto}");
        // sitk_stuff: LPS origin/direction (x, y, z) into a RAS affine.
        let a = props.affine.unwrap();
        assert_eq!(a[0], [2.0, -0.0, -0.0, -47.0]);
        assert_eq!(a[1], [-0.0, 1.0, -0.0, -19.5]);
        assert_eq!(a[2], [0.0, 0.0, 0.5, -11.5]);
        // The symbolic value model holds the rest.
        let p = pickle::read_pickle(&path).unwrap();
        let extra = p.get(&p.root, "extra").unwrap();
        assert_eq!(
            pickle::to_json(&p, extra),
            expected["extra"],
            "protocol {proto}"
        );
    }
}

#[test]
fn hostile_pickles_are_refused_with_the_opcode() {
    // os.system via REDUCE is only ever a symbolic value; a properties file that is not a dict
    // of the expected fields is a format error, and nothing runs.
    let evil = b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04echo\x85R.";
    let p = pickle::parse_pickle(Path::new("evil.pkl"), evil).unwrap();
    assert_eq!(
        pickle::to_json(&p, &p.root),
        serde_json::json!("<object os.system>")
    );
    let err = patchflow_nnunet::properties_from_pickle(Path::new("evil.pkl"), &p).unwrap_err();
    assert!(matches!(err, NnunetError::Format { .. }), "{err}");
    // Extension registry and persistent ids are not supported.
    let err = pickle::parse_pickle(Path::new("e.pkl"), b"\x80\x04\x82\x01.")
        .unwrap_err()
        .to_string();
    assert!(err.contains("EXT1") && err.contains("e.pkl"), "{err}");
}
