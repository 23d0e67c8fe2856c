//! glibc's malloc returns every block above its mmap threshold (dynamic, at most 32 MiB through
//! `mallopt`) to the kernel as soon as libtorch frees it, so each training step maps, faults in
//! and zeroes its large activations and logits again: 685k page faults in 6 LoRA steps of the
//! `gemma3-bench` preset, about a tenth of the step time (benchmarks/README.md). A threshold above
//! 32 MiB can only be set through `GLIBC_TUNABLES`, which glibc reads at process start, so the
//! commands that train or evaluate re-execute themselves once with it set (same process id, same
//! arguments). Freed memory then stays with the process for the next step; peak memory is
//! unchanged. A `GLIBC_TUNABLES` that already sets the mmap threshold is left as the user wrote
//! it, and `ATOLL_MALLOC_TUNED=0` turns this off.

/// Keep freed blocks of any size in the heap and never trim it.
const TUNABLES: &str =
    "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295";
const MARKER: &str = "ATOLL_MALLOC_TUNED";

/// Re-executes the running binary with the tuned allocator unless it already runs with it (or the
/// user opted out). Returns only when it did not re-execute: not Linux/glibc, already tuned, or
/// the exec failed (the command then runs with glibc's defaults).
pub fn reexec_with_tuned_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os(MARKER).is_some() {
            return;
        }
        let existing = std::env::var("GLIBC_TUNABLES").ok();
        if existing
            .as_deref()
            .is_some_and(|t| t.contains("glibc.malloc.mmap_threshold"))
        {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let tunables = match existing {
            Some(t) if !t.is_empty() => format!("{t}:{TUNABLES}"),
            _ => TUNABLES.to_string(),
        };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        // `exec` returns only on failure; the command then goes on untuned.
        let _ = command
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .env(MARKER, "1")
            .exec();
    }
}
