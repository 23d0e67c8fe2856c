//! The libtorch rpath (shared with the other crates), and the C++ kernels libtorch lacks on CPU
//! (`csrc/`), compiled against the same libtorch headers torch-sys builds tch with.

#[path = "../build/rpath.rs"]
mod rpath;

fn main() {
    rpath::main();
    for file in ["csrc/rms_norm.cpp", "csrc/geglu.cpp", "csrc/ffi_error.h"] {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys exports where it found libtorch (LIBTORCH, a system install or a Python torch);
    // the headers sit beside the libraries.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys exports DEP_TCH_LIBTORCH_LIB on Linux and macOS");
    let root = std::path::Path::new(&lib)
        .parent()
        .expect("the libtorch lib directory has a parent")
        .to_path_buf();
    let include = root.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .opt_level(3)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // at::parallel_for runs its body on libtorch's OpenMP threads only when built with
        // OpenMP; torch-sys already links the libgomp libtorch ships.
        .flag("-fopenmp")
        // Lets the compiler turn the kernels' clamps into vector selects (no code here reads
        // floating-point exception flags).
        .flag("-fno-trapping-math")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/rms_norm.cpp")
        .file("csrc/geglu.cpp")
        .compile("atoll_kernels");
}
