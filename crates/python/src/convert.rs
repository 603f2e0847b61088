//! Conversions between Python values and the client's types: the stream configuration, read
//! from the keyword arguments the Python layer collects (every bad value is an
//! `InvalidArgument` naming its argument), and the daemon's answers as dictionaries.

use std::collections::BTreeMap;

use patchflow_client::{
    Augmentation, DatasetDescription, DatasetSummary, ImageDtype, ListDatasetsResponse, Policy,
    ServerLimits, SetAsideCase, StreamConfig,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::invalid;

/// Largest patch edge accepted before asking the daemon (which applies its own limits).
const MAX_EDGE: i64 = 1 << 16;

/// Reads `key` of `d`, `None` when absent or `None`.
fn opt<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>> {
    match d.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => {
            let given = v
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string());
            v.extract::<T>()
                .map(Some)
                .map_err(|_| invalid(key, format!("{}, got {given}", type_hint::<T>())))
        }
    }
}

/// What an argument of type `T` expects, for error messages.
fn type_hint<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    if name.contains("String") {
        "expected a string"
    } else if name.contains("f64") {
        "expected a number"
    } else if name.contains("Vec") || name.contains('[') {
        "expected a sequence"
    } else if name.contains("BTreeMap") {
        "expected a dict"
    } else {
        "expected an integer"
    }
}

/// A stream configuration from the keyword arguments of `Client.stream` (a dict whose values
/// the Python layer filled with their defaults).
pub(crate) fn stream_config(d: &Bound<'_, PyDict>) -> PyResult<StreamConfig> {
    let dataset: String =
        opt(d, "dataset")?.ok_or_else(|| invalid("dataset", "no dataset named"))?;
    if dataset.is_empty() {
        return Err(invalid("dataset", "no dataset named"));
    }
    let patch = patch_arg(d)?;
    let batch: i64 = opt(d, "batch")?.ok_or_else(|| invalid("batch", "missing"))?;
    let batch_size = u32::try_from(batch)
        .ok()
        .filter(|&b| b >= 1)
        .ok_or_else(|| invalid("batch", format!("{batch} is not a batch size (1 or more)")))?;
    let mut config = StreamConfig::new(dataset, patch, batch_size);
    config.policy = policy_arg(d)?;
    let crops: i64 = opt(d, "crops_per_case")?.unwrap_or(1);
    config.crops_per_case = u32::try_from(crops)
        .ok()
        .filter(|&c| c >= 1)
        .ok_or_else(|| invalid("crops_per_case", format!("{crops} is not 1 or more")))?;
    config.dtype = dtype_arg(d)?;
    let seed: Option<i128> = opt(d, "seed")?;
    config.seed = match seed {
        None => 0,
        Some(s) => {
            u64::try_from(s).map_err(|_| invalid("seed", format!("{s} is not in 0..2**64")))?
        }
    };
    config.cases = match d.get_item("cases")? {
        None => Vec::new(),
        Some(v) if v.is_none() => Vec::new(),
        Some(v) => {
            if v.is_instance_of::<pyo3::types::PyString>() {
                return Err(invalid(
                    "cases",
                    "expected a list of case ids, got one string",
                ));
            }
            let cases: Vec<String> = v
                .extract()
                .map_err(|_| invalid("cases", "expected a list of case ids"))?;
            if cases.is_empty() {
                return Err(invalid("cases", "an empty list (use None for every case)"));
            }
            cases
        }
    };
    config.augmentation = augment_arg(d)?;
    Ok(config)
}

fn patch_arg(d: &Bound<'_, PyDict>) -> PyResult<[i64; 3]> {
    let Some(v) = d.get_item("patch")? else {
        return Err(invalid("patch", "missing"));
    };
    let edges: Vec<i64> = if let Ok(edge) = v.extract::<i64>() {
        vec![edge; 3]
    } else {
        v.extract()
            .map_err(|_| invalid("patch", "expected (z, y, x) edge lengths or one edge"))?
    };
    let patch: [i64; 3] = edges.as_slice().try_into().map_err(|_| {
        invalid(
            "patch",
            format!("{edges:?} has {} edges, expected (z, y, x)", edges.len()),
        )
    })?;
    if let Some(bad) = patch.iter().find(|&&e| !(1..=MAX_EDGE).contains(&e)) {
        return Err(invalid(
            "patch",
            format!("edge {bad} of {patch:?} is not in 1..={MAX_EDGE}"),
        ));
    }
    Ok(patch)
}

fn policy_arg(d: &Bound<'_, PyDict>) -> PyResult<Policy> {
    let name: String = opt(d, "policy")?.unwrap_or_else(|| "foreground".into());
    let weights: Option<BTreeMap<i64, f64>> = opt(d, "class_weights")?;
    let fraction: Option<f64> = opt(d, "fraction")?;
    match (name.as_str(), weights) {
        ("foreground" | "class_weights", Some(w)) => {
            if fraction.is_some() {
                return Err(invalid(
                    "fraction",
                    "applies to policy='foreground', not with class_weights",
                ));
            }
            if w.is_empty() {
                return Err(invalid("class_weights", "no class given"));
            }
            let mut out = BTreeMap::new();
            for (class, weight) in w {
                let c = u16::try_from(class).map_err(|_| {
                    invalid("class_weights", format!("class {class} is not in 0..65535"))
                })?;
                if !(weight.is_finite() && weight >= 0.0) {
                    return Err(invalid(
                        "class_weights",
                        format!("weight {weight} of class {class} is not a non-negative number"),
                    ));
                }
                out.insert(c, weight);
            }
            if out.values().all(|&w| w == 0.0) {
                return Err(invalid("class_weights", "every weight is 0"));
            }
            Ok(Policy::ClassWeights(out))
        }
        ("class_weights", None) => Err(invalid(
            "class_weights",
            "policy='class_weights' needs class_weights={class: weight, ...}",
        )),
        ("foreground", None) => {
            let fraction = fraction.unwrap_or(0.33);
            if !(0.0..=1.0).contains(&fraction) {
                return Err(invalid("fraction", format!("{fraction} is not in [0, 1]")));
            }
            Ok(Policy::ForegroundOversample { fraction })
        }
        ("uniform", None) if fraction.is_some() => Err(invalid(
            "fraction",
            "applies to policy='foreground', not to 'uniform'",
        )),
        ("uniform", None) => Ok(Policy::Uniform),
        ("uniform", Some(_)) => Err(invalid(
            "class_weights",
            "given with policy='uniform' (class weights are a policy of their own)",
        )),
        (other, _) => Err(invalid(
            "policy",
            format!("{other:?} is not 'foreground', 'uniform' or 'class_weights'"),
        )),
    }
}

fn dtype_arg(d: &Bound<'_, PyDict>) -> PyResult<ImageDtype> {
    let name: String = opt(d, "dtype")?.unwrap_or_else(|| "f32".into());
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(ImageDtype::F32),
        "f16" | "float16" => Ok(ImageDtype::F16),
        "bf16" | "bfloat16" => Ok(ImageDtype::Bf16),
        _ => Err(invalid(
            "dtype",
            format!("{name:?} is not 'f32', 'f16' or 'bf16'"),
        )),
    }
}

fn augment_arg(d: &Bound<'_, PyDict>) -> PyResult<Option<Augmentation>> {
    let no_mirror: Vec<i64> = opt(d, "no_mirror_axes")?.unwrap_or_default();
    let mut axes = Vec::with_capacity(no_mirror.len());
    for a in no_mirror {
        let axis = u32::try_from(a).ok().filter(|&a| a <= 2).ok_or_else(|| {
            invalid(
                "no_mirror_axes",
                format!("axis {a} is not 0 (z), 1 (y) or 2 (x)"),
            )
        })?;
        if !axes.contains(&axis) {
            axes.push(axis);
        }
    }
    let Some(v) = d.get_item("augment")? else {
        return no_augment(axes);
    };
    if v.is_none() || v.is_instance_of::<pyo3::types::PyBool>() && !v.is_truthy()? {
        return no_augment(axes);
    }
    if let Ok(preset) = v.extract::<String>() {
        if preset.is_empty() {
            return Err(invalid(
                "augment",
                "an empty preset name (None for plain crops)",
            ));
        }
        return Ok(Some(Augmentation {
            preset,
            spec_json: String::new(),
            no_mirror_axes: axes,
        }));
    }
    if v.is_instance_of::<PyDict>() {
        let json = d
            .py()
            .import("json")?
            .call_method1("dumps", (v,))
            .and_then(|s| s.extract::<String>())
            .map_err(|e| {
                invalid(
                    "augment",
                    format!("the spec is not JSON-serialisable ({})", e.value(d.py())),
                )
            })?;
        return Ok(Some(Augmentation {
            preset: String::new(),
            spec_json: json,
            no_mirror_axes: axes,
        }));
    }
    Err(invalid(
        "augment",
        "expected None, a preset name ('nnunet') or a spec dict",
    ))
}

fn no_augment(axes: Vec<u32>) -> PyResult<Option<Augmentation>> {
    if axes.is_empty() {
        Ok(None)
    } else {
        Err(invalid(
            "no_mirror_axes",
            "given without augmentation (augment=None mirrors nothing)",
        ))
    }
}

/// Server limits as a dict.
pub(crate) fn limits<'py>(py: Python<'py>, l: &ServerLimits) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("max_patch_voxels", l.max_patch_voxels)?;
    d.set_item("max_batch_bytes", l.max_batch_bytes)?;
    d.set_item("max_batch_size", l.max_batch_size)?;
    d.set_item("max_credits", l.max_credits)?;
    d.set_item("max_message_bytes", l.max_message_bytes)?;
    d.set_item("max_streams", l.max_streams)?;
    d.set_item("max_shared_slots", l.max_shared_slots)?;
    Ok(d)
}

fn set_aside<'py>(py: Python<'py>, cases: &[SetAsideCase]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for c in cases {
        let d = PyDict::new(py);
        d.set_item("id", &c.id)?;
        d.set_item("case_index", c.case_index)?;
        d.set_item("reason", &c.reason)?;
        list.append(d)?;
    }
    Ok(list)
}

fn summary<'py>(py: Python<'py>, s: &DatasetSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &s.name)?;
    d.set_item("num_cases", s.num_cases)?;
    d.set_item("num_channels", s.num_channels)?;
    d.set_item("set_aside", set_aside(py, &s.set_aside)?)?;
    Ok(d)
}

/// `ListDatasets` as `{"datasets": [...], "limits": {...}}`.
pub(crate) fn listing<'py>(
    py: Python<'py>,
    r: &ListDatasetsResponse,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let list = PyList::empty(py);
    for s in &r.datasets {
        list.append(summary(py, s)?)?;
    }
    d.set_item("datasets", list)?;
    d.set_item("limits", limits(py, &r.limits.unwrap_or_default())?)?;
    Ok(d)
}

/// `DescribeDataset` as a dict with the proto's field names.
pub(crate) fn description<'py>(
    py: Python<'py>,
    r: &DatasetDescription,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &r.name)?;
    let cases = PyList::empty(py);
    for c in &r.cases {
        let cd = PyDict::new(py);
        cd.set_item("id", &c.id)?;
        cd.set_item("shape", c.shape.clone())?;
        cd.set_item("spacing", c.spacing.clone())?;
        cd.set_item(
            "class_voxels",
            c.class_voxels
                .iter()
                .map(|(&k, &v)| (k, v))
                .collect::<BTreeMap<u32, u64>>(),
        )?;
        let norms = PyList::empty(py);
        for n in &c.normalization {
            let nd = PyDict::new(py);
            nd.set_item("scheme", &n.scheme)?;
            nd.set_item("clip", n.has_clip.then_some((n.clip_lo, n.clip_hi)))?;
            nd.set_item("mean", n.mean)?;
            nd.set_item("inv_std", n.inv_std)?;
            norms.append(nd)?;
        }
        cd.set_item("normalization", norms)?;
        cases.append(cd)?;
    }
    d.set_item("cases", cases)?;
    let channels = PyList::empty(py);
    for c in &r.channels {
        let cd = PyDict::new(py);
        cd.set_item("name", &c.name)?;
        cd.set_item("stored_dtype", &c.stored_dtype)?;
        cd.set_item("scheme", &c.scheme)?;
        channels.append(cd)?;
    }
    d.set_item("channels", channels)?;
    let classes = PyList::empty(py);
    for c in &r.classes {
        let cd = PyDict::new(py);
        cd.set_item("value", c.value)?;
        cd.set_item("name", &c.name)?;
        cd.set_item("voxels", c.voxels)?;
        cd.set_item("cases", c.cases)?;
        classes.append(cd)?;
    }
    d.set_item("classes", classes)?;
    d.set_item(
        "label_names",
        r.label_names
            .iter()
            .map(|(&k, v)| (k, v.clone()))
            .collect::<BTreeMap<u32, String>>(),
    )?;
    d.set_item("ignore_label", r.ignore_label)?;
    d.set_item("set_aside", set_aside(py, &r.set_aside)?)?;
    Ok(d)
}
