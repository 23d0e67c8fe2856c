//! Shared build script: records the libtorch directory as an rpath so `atoll` and the test binaries
//! run without LD_LIBRARY_PATH. torch-sys finds libtorch through the same `LIBTORCH` variable.
pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        // A CUDA libtorch registers its CUDA backend when libtorch_cuda.so loads, but nothing
        // calls into it directly, so the linker's default --as-needed would drop it and
        // `tch::Cuda::is_available()` would say false on a GPU machine. Keep it as a dependency.
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
        }
    }
}
