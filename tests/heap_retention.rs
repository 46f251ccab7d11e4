//! The `finetune_gpt2` example's heap setting (`heap.rs`): after it, a
//! buffer larger than 2 GiB, freed, comes back without faulting its pages
//! in again (with the trim threshold at `i32::MAX`, glibc trimmed it and
//! every page faulted again). Its own test binary without the test harness
//! (Cargo.toml): the setting is the process's, and the buffers come from the
//! main thread's heap, as the example's do.

#[path = "../examples/finetune_gpt2/heap.rs"]
mod heap;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    heap::keep_freed_memory();
    let len = 2_400 << 20; // 2.34 GiB: more free top than i32::MAX bytes
    let pages = (len / 4096) as i64;
    let first = minor_faults();
    drop(std::hint::black_box(touched(len)));
    let faulted = minor_faults() - first;
    assert!(faulted >= pages / 2, "the first buffer faulted {faulted} pages of {pages}: fresh memory expected");
    let second = minor_faults();
    drop(std::hint::black_box(touched(len)));
    let again = minor_faults() - second;
    assert!(again < pages / 100, "the buffer faulted {again} of its {pages} pages in again: the heap was trimmed");
    println!("heap_retention: a freed {len}-byte buffer came back with {again} page faults (first use: {faulted})");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    heap::keep_freed_memory();
    println!("heap_retention: glibc's setting only; nothing to check here");
}

/// Minor page faults of this process so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults() -> i64 {
    // SAFETY: zeroed is a valid rusage, which getrusage overwrites.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer to a rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    usage.ru_minflt
}

/// A buffer of `len` bytes, every page written.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn touched(len: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; len];
    buffer.iter_mut().step_by(4096).for_each(|b| *b = 1);
    buffer
}
