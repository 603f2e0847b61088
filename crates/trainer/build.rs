//! Gives every binary of this package (the trainer, tests, examples) a run-time search path for
//! the libtorch it was linked against, so it runs without `LD_LIBRARY_PATH`. On a machine where
//! that folder does not exist (a GPU node with its own PyTorch), `LD_LIBRARY_PATH` still works:
//! the linker writes `DT_RUNPATH`, which the loader consults after it.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("windows") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        }
        println!("cargo:rustc-env=PATCHFLOW_LIBTORCH_LIB={lib}");
    } else {
        println!("cargo:rustc-env=PATCHFLOW_LIBTORCH_LIB=");
    }
}
