//! The process heap keeps what it frees. glibc hands a freed buffer above
//! its mmap threshold back to the OS, and trims the heap's free top once it
//! passes the trim threshold, so each training step would fault its large
//! buffers in again, 4 KiB at a time (about 1.4 µs a page on our 2-core
//! VMs). GPT-2 124M at batch 4 x 256 tokens can free more than 2 GiB at the
//! heap's top at once: with the trim threshold at `i32::MAX`, 5 of 6 runs
//! faulted gigabytes in again every step and took 1.15-1.39x as long
//! (BENCHMARKS.md). It costs the heap's high-water mark above the live
//! memory.

/// Large buffers come from the heap, never `mmap`, and the heap is never
/// trimmed (`M_TRIM_THRESHOLD = -1`, which mallopt(3) documents as turning
/// trimming off; its largest positive value, `i32::MAX`, still trims 2 GiB
/// of free top). That holds for the main thread, where candle allocates the
/// outputs of the ops it runs: other threads allocate from glibc's thread
/// arenas, which still map a buffer larger than their 64 MiB heaps. Call
/// before any other thread exists. Nothing outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
