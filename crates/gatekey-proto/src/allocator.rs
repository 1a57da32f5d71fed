//! Allocator settings for bulk streams.
//!
//! Stream data moves in buffers of up to a few hundred KiB. glibc serves
//! allocations over its (adaptive) mmap threshold with fresh mappings and
//! gives memory at the top of the heap back to the kernel once 128 KiB are
//! free, so a busy stream would otherwise fault in and zero new pages for
//! almost every buffer: measured at a quarter of the agent's CPU time per
//! transferred byte. Fixed, higher thresholds keep those buffers in the heap.

/// Allocations above this size are still given their own mapping.
const MMAP_THRESHOLD: i32 = 4 * 1024 * 1024;
/// Free memory at the top of the heap kept for reuse before it is returned.
const TRIM_THRESHOLD: i32 = 32 * 1024 * 1024;

/// Applies the settings; call once at start, before any threads exist.
pub fn tune_for_streaming() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before the process starts other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
