//! Finding CUDA at start-up, choosing the device, and bf16 autocast.
//!
//! The trainer links libtorch dynamically. The linker drops `libtorch_cuda.so` from the binary's
//! needed libraries (it links "as needed" and no symbol of it is referenced), so CUDA kernels are
//! not registered unless the library is loaded explicitly. [`load_cuda`] does that with
//! `dlopen(RTLD_NOW | RTLD_GLOBAL)`: on a GPU machine it succeeds and CUDA becomes available;
//! on a CPU machine (where the CUDA runtime libraries it needs are missing) it fails quietly and
//! training runs on the CPU. One binary serves both.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use tch::Device;

use crate::TrainerError;

/// The folder of the libtorch the trainer was linked against (empty when unknown).
const BUILD_LIBTORCH_LIB: &str = env!("PATCHFLOW_LIBTORCH_LIB");

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when available, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA device (an error when CUDA is not available).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = TrainerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    TrainerError::config(
                        "device",
                        format!("{s:?} is not one of auto, cpu, cuda, cuda:N"),
                    )
                }),
        }
    }
}

/// The outcome of looking for CUDA.
#[derive(Clone, Debug)]
pub struct CudaStatus {
    /// The `libtorch_cuda.so` that was loaded, if any.
    pub loaded_from: Option<PathBuf>,
    /// Why loading failed, per candidate tried (empty when it succeeded).
    pub attempts: Vec<String>,
    /// Whether libtorch reports CUDA as usable after loading.
    pub available: bool,
    /// Number of CUDA devices.
    pub devices: usize,
}

static CUDA: OnceLock<CudaStatus> = OnceLock::new();

/// Directory of the `libtorch_cpu.so` mapped into this process (from `/proc/self/maps`).
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libtorch_cpu."))
        })
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

/// The last `dlerror()` message.
fn dl_error() -> String {
    // SAFETY: dlerror returns either null or a pointer to a NUL-terminated string owned by the C
    // library, valid until the next dl* call on this thread; it is copied at once.
    unsafe {
        let msg = libc::dlerror();
        if msg.is_null() {
            "unknown dlopen error".to_string()
        } else {
            CStr::from_ptr(msg).to_string_lossy().into_owned()
        }
    }
}

/// Tries `dlopen(candidate, RTLD_NOW | RTLD_GLOBAL)`; the handle is kept for the process's
/// lifetime on success.
fn try_dlopen(candidate: &str) -> Result<(), String> {
    let c = CString::new(candidate).map_err(|_| format!("{candidate}: path contains NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call. Loading libtorch_cuda
    // runs its static initialisers, which register CUDA kernels with the already loaded
    // libtorch; that is the purpose of the call. The handle is intentionally never closed.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        Err(format!("{candidate}: {}", dl_error()))
    } else {
        Ok(())
    }
}

/// Loads `libtorch_cuda.so` when it can be found and its CUDA libraries load, then asks
/// libtorch whether CUDA is usable. Runs once per process; later calls return the first result.
///
/// Candidates, in order: beside the `libtorch_cpu.so` this process mapped, beside the libtorch
/// the binary was built against, and the bare name (the loader's search path, e.g.
/// `LD_LIBRARY_PATH`).
pub fn load_cuda() -> &'static CudaStatus {
    CUDA.get_or_init(|| {
        let mut candidates: Vec<String> = Vec::new();
        for dir in [
            loaded_libtorch_dir(),
            (!BUILD_LIBTORCH_LIB.is_empty()).then(|| PathBuf::from(BUILD_LIBTORCH_LIB)),
        ]
        .into_iter()
        .flatten()
        {
            let p = dir.join("libtorch_cuda.so");
            if p.exists() {
                candidates.push(p.to_string_lossy().into_owned());
            }
        }
        candidates.push("libtorch_cuda.so".to_string());
        candidates.dedup();
        let mut attempts = Vec::new();
        let mut loaded_from = None;
        for c in &candidates {
            match try_dlopen(c) {
                Ok(()) => {
                    loaded_from = Some(PathBuf::from(c));
                    break;
                }
                Err(e) => attempts.push(e),
            }
        }
        let available = tch::Cuda::is_available();
        let devices = if available {
            usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
        } else {
            0
        };
        let status = CudaStatus {
            loaded_from,
            attempts,
            available,
            devices,
        };
        if status.available {
            tracing::info!(from = ?status.loaded_from, devices, "CUDA available");
        } else {
            tracing::info!(attempts = ?status.attempts, "CUDA not available; using the CPU");
        }
        status
    })
}

/// Resolves `choice` to a libtorch device, loading CUDA first.
///
/// # Errors
/// [`TrainerError::Device`] when CUDA (or the given CUDA device) was asked for and is not
/// usable.
pub fn resolve_device(choice: DeviceChoice) -> Result<Device, TrainerError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            let s = load_cuda();
            Ok(if s.available {
                Device::Cuda(0)
            } else {
                Device::Cpu
            })
        }
        DeviceChoice::Cuda(i) => {
            let s = load_cuda();
            if !s.available {
                return Err(TrainerError::Device(format!(
                    "CUDA was asked for but is not available (tried: {})",
                    s.attempts.join("; ")
                )));
            }
            if i >= s.devices {
                return Err(TrainerError::Device(format!(
                    "cuda:{i} was asked for but only {} CUDA device(s) exist",
                    s.devices
                )));
            }
            Ok(Device::Cuda(i))
        }
    }
}

/// `c10::DeviceType::CUDA`.
const C10_DEVICE_CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16`.
const C10_SCALAR_BFLOAT16: i8 = 15;

/// `at::autocast::set_autocast_dtype(c10::DeviceType, c10::ScalarType)`.
const SET_AUTOCAST_DTYPE: &CStr =
    c"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE";
/// `at::autocast::get_autocast_dtype(c10::DeviceType)`.
const GET_AUTOCAST_DTYPE: &CStr = c"_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE";

type SetAutocastDtype = unsafe extern "C" fn(i8, i8);
type GetAutocastDtype = unsafe extern "C" fn(i8) -> i8;

/// Looks up a symbol of the loaded libtorch.
fn symbol(name: &CStr) -> Option<*mut libc::c_void> {
    // SAFETY: RTLD_DEFAULT searches the global symbol scope of the process; `name` is a valid
    // NUL-terminated string. The result is only a pointer, checked for null.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// The element type CUDA autocast currently casts to, as a `c10::ScalarType` code (5 = half,
/// 15 = bfloat16); `None` when libtorch does not export the getter.
pub fn cuda_autocast_dtype_code() -> Option<i8> {
    let p = symbol(GET_AUTOCAST_DTYPE)?;
    // SAFETY: the symbol is libtorch's `c10::ScalarType get_autocast_dtype(c10::DeviceType)`;
    // both enums are `int8_t`-based and passed/returned in integer registers exactly like
    // `int8_t`, which is what the function pointer type declares.
    let get: GetAutocastDtype = unsafe { std::mem::transmute(p) };
    // SAFETY: plain call of a state getter with a valid device type.
    Some(unsafe { get(C10_DEVICE_CUDA) })
}

/// Makes CUDA autocast cast to bfloat16 (libtorch's default is float16, which needs gradient
/// scaling; bf16 has float32's range and does not).
///
/// # Errors
/// [`TrainerError::Device`] when libtorch does not export the setter (then the trainer runs in
/// float32 rather than in float16 without gradient scaling).
pub fn set_cuda_autocast_bf16() -> Result<(), TrainerError> {
    let p = symbol(SET_AUTOCAST_DTYPE).ok_or_else(|| {
        TrainerError::Device("libtorch does not export at::autocast::set_autocast_dtype".into())
    })?;
    // SAFETY: the symbol is libtorch's `void set_autocast_dtype(c10::DeviceType,
    // c10::ScalarType)`; both enums are `int8_t`-based and passed like `int8_t`.
    let set: SetAutocastDtype = unsafe { std::mem::transmute(p) };
    // SAFETY: plain call of a state setter with a valid device and scalar type.
    unsafe { set(C10_DEVICE_CUDA, C10_SCALAR_BFLOAT16) };
    match cuda_autocast_dtype_code() {
        Some(C10_SCALAR_BFLOAT16) => Ok(()),
        other => Err(TrainerError::Device(format!(
            "CUDA autocast dtype is {other:?} after setting bfloat16"
        ))),
    }
}

/// `at::autocast::is_autocast_enabled(c10::DeviceType)`.
const IS_AUTOCAST_ENABLED: &CStr = c"_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE";
/// `at::autocast::set_autocast_enabled(c10::DeviceType, bool)`.
const SET_AUTOCAST_ENABLED: &CStr = c"_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb";
/// `at::autocast::increment_nesting()`.
const INCREMENT_NESTING: &CStr = c"_ZN2at8autocast17increment_nestingEv";
/// `at::autocast::decrement_nesting()`.
const DECREMENT_NESTING: &CStr = c"_ZN2at8autocast17decrement_nestingEv";
/// `at::autocast::clear_cache()`.
const CLEAR_CACHE: &CStr = c"_ZN2at8autocast11clear_cacheEv";

/// libtorch's autocast state functions that name the device type. `tch::autocast` calls the
/// device-less `is_enabled`/`set_enabled`, which libtorch 2.4 and later deprecate with a warning
/// printed on every call: three lines per training step.
struct AutocastApi {
    is_enabled: IsEnabled,
    set_enabled: SetEnabled,
    increment_nesting: Nesting,
    decrement_nesting: Nesting,
    clear_cache: ClearCache,
}

type IsEnabled = unsafe extern "C" fn(i8) -> bool;
type SetEnabled = unsafe extern "C" fn(i8, bool);
type Nesting = unsafe extern "C" fn() -> libc::c_int;
type ClearCache = unsafe extern "C" fn();
type Symbol = *mut libc::c_void;

/// The functions of [`AutocastApi`], looked up once; `None` when this libtorch lacks one.
fn autocast_api() -> Option<&'static AutocastApi> {
    static API: OnceLock<Option<AutocastApi>> = OnceLock::new();
    API.get_or_init(|| {
        let [is, set, inc, dec, clear] = [
            IS_AUTOCAST_ENABLED,
            SET_AUTOCAST_ENABLED,
            INCREMENT_NESTING,
            DECREMENT_NESTING,
            CLEAR_CACHE,
        ]
        .map(symbol);
        // SAFETY: each symbol is the libtorch function its constant names, with the signature
        // declared by the field: `c10::DeviceType` is `int8_t`-based and passed like `int8_t`,
        // `bool` and `int` map to Rust's `bool` and `c_int`; none of them throws.
        unsafe {
            Some(AutocastApi {
                is_enabled: std::mem::transmute::<Symbol, IsEnabled>(is?),
                set_enabled: std::mem::transmute::<Symbol, SetEnabled>(set?),
                increment_nesting: std::mem::transmute::<Symbol, Nesting>(inc?),
                decrement_nesting: std::mem::transmute::<Symbol, Nesting>(dec?),
                clear_cache: std::mem::transmute::<Symbol, ClearCache>(clear?),
            })
        }
    })
    .as_ref()
}

/// CUDA autocast switched on for this thread until dropped, then put back as it was (also when
/// the closure it guards panics); the autocast cache is cleared when the outermost one ends, as
/// `tch::autocast` and PyTorch's `torch.autocast` do.
struct AutocastGuard {
    api: &'static AutocastApi,
    previous: bool,
}

impl AutocastGuard {
    fn enter(api: &'static AutocastApi) -> AutocastGuard {
        // SAFETY: plain calls of libtorch's per-thread autocast state functions.
        let previous = unsafe { (api.is_enabled)(C10_DEVICE_CUDA) };
        // SAFETY: as above; `drop` undoes both.
        unsafe {
            (api.set_enabled)(C10_DEVICE_CUDA, true);
            (api.increment_nesting)();
        }
        AutocastGuard { api, previous }
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; the nesting was incremented there.
        unsafe {
            if (self.api.decrement_nesting)() == 0 {
                (self.api.clear_cache)();
            }
            (self.api.set_enabled)(C10_DEVICE_CUDA, self.previous);
        }
    }
}

/// Runs `f` under CUDA autocast when `enabled` and CUDA is available (see
/// [`set_cuda_autocast_bf16`]), else plainly.
pub fn with_autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !enabled || !tch::Cuda::is_available() {
        return f();
    }
    match autocast_api() {
        Some(api) => {
            let _on = AutocastGuard::enter(api);
            f()
        }
        None => tch::autocast(true, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_parses() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        let e = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(e.to_string().contains("device"));
    }

    /// The autocast dtype can be set through the exported C++ symbol and read back; this works
    /// without a GPU because it only changes libtorch's per-thread autocast state.
    #[test]
    fn autocast_dtype_is_set_to_bf16() {
        set_cuda_autocast_bf16().unwrap();
        assert_eq!(cuda_autocast_dtype_code(), Some(C10_SCALAR_BFLOAT16));
    }

    /// The guard switches CUDA autocast on through the device-typed functions and puts the
    /// previous state back, nested and after a panic; this is per-thread state, so it works
    /// without a GPU.
    #[test]
    fn autocast_guard_sets_and_restores_the_state() {
        let api = autocast_api().expect("libtorch exports the device-typed autocast functions");
        // SAFETY: plain call of a state getter with a valid device type.
        let on = || unsafe { (api.is_enabled)(C10_DEVICE_CUDA) };
        assert!(!on());
        {
            let _outer = AutocastGuard::enter(api);
            assert!(on());
            {
                let _inner = AutocastGuard::enter(api);
                assert!(on());
            }
            assert!(on(), "the inner guard restores the outer state");
        }
        assert!(!on());
        let caught = std::panic::catch_unwind(|| {
            let _g = AutocastGuard::enter(api);
            panic!("inside autocast");
        });
        assert!(caught.is_err());
        assert!(!on(), "a panic inside restores the state");
    }

    #[test]
    fn cpu_and_auto_resolve_without_error() {
        assert_eq!(resolve_device(DeviceChoice::Cpu).unwrap(), Device::Cpu);
        let auto = resolve_device(DeviceChoice::Auto).unwrap();
        let status = load_cuda();
        assert_eq!(auto == Device::Cpu, !status.available);
        if !status.available {
            assert!(resolve_device(DeviceChoice::Cuda(0)).is_err());
        }
    }
}
