//! Shared build script: records the libtorch directory as an rpath so `atoll` and the test binaries
//! run without LD_LIBRARY_PATH. torch-sys finds libtorch through the same `LIBTORCH` variable.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
