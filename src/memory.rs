//! An opt-in for training on CUDA: keep the memory candle frees in CUDA's
//! pool. candle allocates every tensor with `cuMemAllocAsync` from the
//! device's default memory pool, whose release threshold is 0: at each
//! synchronisation the pool hands freed memory back to the driver, and the
//! next large buffer is mapped afresh. On an H200 (BENCHMARKS.md, 2026-12-04)
//! that mapping made the logits loss's out-of-place backward at 8192 x 128256
//! bf16 take 4.3 ms instead of 1.3, and a whole forward + backward through
//! candle 21.7 ms instead of 7.4.

use candle::{Device, Result};

/// Keeps the memory that candle frees on `device` in CUDA's default memory
/// pool (its release threshold raised to the maximum) instead of returning it
/// to the driver at each synchronisation, as PyTorch's caching allocator
/// keeps its own. Later allocations of the same sizes then reuse it without
/// mapping memory again: a training step's buffers, which are the same every
/// step, cost nothing after the first one.
///
/// The trade-off: the memory the process has once used stays reserved for it
/// (other processes on the GPU cannot have it) until the process exits or
/// the threshold is lowered again. It is a setting of the device's pool, for
/// the whole process: every candle tensor on that device is allocated from
/// it. A no-op on the CPU, on devices other than CUDA, and on a GPU without
/// memory pools (cudarc then allocates with `cuMemAlloc`, which has no pool
/// to keep memory in).
///
/// # Errors
/// The driver's, if it refuses to give the device's pool or to set it.
pub fn retain_freed_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if cuda::allocates_from_pools(cuda) {
            return cuda::set_release_threshold(cuda.cuda_stream().context().ordinal(), u64::MAX);
        }
    }
    let _ = device;
    Ok(())
}

/// The device memory, in bytes, that new tensors on `device` can have now:
/// the driver's free memory plus what CUDA's default pool holds reserved but
/// unused. The driver counts the latter as used, though candle's next
/// allocations reuse it: after [`retain_freed_memory`], every buffer candle
/// has freed stays there (on a GPU without memory pools, the driver's free
/// memory alone). `None` on the CPU and devices other than CUDA.
///
/// # Errors
/// The driver's, if it cannot report the free memory or the pool's.
pub fn available_memory(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda::available_memory(cuda).map(Some);
    }
    let _ = device;
    Ok(None)
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle::cuda_backend::cudarc::driver::sys;
    use candle::cuda_backend::WrapErr;
    use candle::{CudaDevice, Result};

    /// Whether candle's allocations on `device` come from its default memory
    /// pool (`cuMemAllocAsync`): cudarc uses `cuMemAlloc` where the GPU does
    /// not support memory pools.
    pub(crate) fn allocates_from_pools(device: &CudaDevice) -> bool {
        device.cuda_stream().context().has_async_alloc()
    }

    /// See [`super::available_memory`].
    pub(crate) fn available_memory(device: &CudaDevice) -> Result<u64> {
        let (free, _total) = device.cuda_stream().context().mem_get_info().w()?;
        if !allocates_from_pools(device) {
            return Ok(free as u64);
        }
        let gpu_id = device.cuda_stream().context().ordinal();
        use sys::CUmemPool_attribute::{CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_CURRENT};
        let reserved = pool_attribute(gpu_id, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        let used = pool_attribute(gpu_id, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Ok(free as u64 + reserved.saturating_sub(used))
    }

    /// Sets the release threshold of device `gpu_id`'s default memory pool.
    pub(crate) fn set_release_threshold(gpu_id: usize, bytes: u64) -> Result<()> {
        let pool = default_pool(gpu_id)?;
        let mut value = bytes;
        // SAFETY: RELEASE_THRESHOLD is a cuuint64_t attribute; `pool` is the live
        // default pool of a device the driver knows, and `value` outlives the call.
        let rc = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut value as *mut u64).cast(),
            )
        };
        check(rc, "cuMemPoolSetAttribute(RELEASE_THRESHOLD)")
    }

    /// The release threshold of device `gpu_id`'s default memory pool (the
    /// tests read it back).
    #[cfg(test)]
    pub(crate) fn release_threshold(gpu_id: usize) -> Result<u64> {
        pool_attribute(gpu_id, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD)
    }

    /// A `cuuint64_t` attribute of device `gpu_id`'s default memory pool: its
    /// release threshold, or the bytes it has reserved or in use.
    fn pool_attribute(gpu_id: usize, attribute: sys::CUmemPool_attribute) -> Result<u64> {
        let pool = default_pool(gpu_id)?;
        let mut value = 0u64;
        // SAFETY: the callers ask only for the attributes whose value is a
        // cuuint64_t (RELEASE_THRESHOLD, RESERVED_MEM_CURRENT, USED_MEM_CURRENT),
        // read into `value`, which outlives the call; `pool` is as in
        // `set_release_threshold`.
        let rc = unsafe { sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast()) };
        check(rc, "cuMemPoolGetAttribute")?;
        Ok(value)
    }

    fn default_pool(gpu_id: usize) -> Result<sys::CUmemoryPool> {
        let Ok(ordinal) = i32::try_from(gpu_id) else { candle::bail!("CUDA device {gpu_id} is out of range") };
        let (mut device, mut pool): (sys::CUdevice, sys::CUmemoryPool) = (0, std::ptr::null_mut());
        // SAFETY: driver queries with valid out-pointers; candle initialised the
        // driver when it made the device this ordinal comes from.
        check(unsafe { sys::cuDeviceGet(&mut device, ordinal) }, "cuDeviceGet")?;
        // SAFETY: as above.
        check(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, device) }, "cuDeviceGetDefaultMemPool")?;
        Ok(pool)
    }

    fn check(rc: sys::CUresult, what: &str) -> Result<()> {
        if rc == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            candle::bail!("CUDA memory pool: {what} failed: {rc:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{available_memory, retain_freed_memory};
    use candle::Device;

    #[test]
    fn nothing_to_do_on_the_cpu() -> candle::Result<()> {
        retain_freed_memory(&Device::Cpu)?;
        assert_eq!(available_memory(&Device::Cpu)?, None);
        Ok(())
    }

    /// The CUDA tests below set the pool's threshold: one at a time.
    #[cfg(feature = "cuda")]
    static POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[cfg(feature = "cuda")]
    fn cuda_device(test: &str) -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(device) => Some(device),
            Err(e) => {
                assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
                eprintln!("SKIP {test}: no CUDA device");
                None
            }
        }
    }

    /// A 256 MiB tensor takes its size from the available memory while it
    /// lives; once freed into a pool that keeps it, the driver still counts it
    /// as used, and the available memory has it back.
    #[cfg(feature = "cuda")]
    #[test]
    fn available_memory_counts_what_the_pool_keeps() -> candle::Result<()> {
        let _pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let Some(device) = cuda_device("available_memory_counts_what_the_pool_keeps") else { return Ok(()) };
        let Device::Cuda(cuda) = &device else { unreachable!("a CUDA device") };
        retain_freed_memory(&device)?;
        const MIB: u64 = 1 << 20;
        let available = || -> candle::Result<u64> {
            device.synchronize()?;
            Ok(available_memory(&device)?.expect("CUDA reports its memory"))
        };
        let before = available()?;
        let tensor = candle::Tensor::zeros(64 << 20, candle::DType::F32, &device)?;
        let during = available()?;
        assert!(during + 240 * MIB <= before, "available {before} bytes before, {during} with 256 MiB in use");
        drop(tensor);
        let after = available()?;
        let (driver_free, _) = {
            use candle::cuda_backend::WrapErr;
            cuda.cuda_stream().context().mem_get_info().w()?
        };
        // Slack for what other tests of this binary may take meanwhile outside the pool (a cuBLAS
        // handle, a module of kernels) when they run in parallel.
        assert!(after + 128 * MIB >= before, "available {before} bytes before, {after} after freeing 256 MiB");
        assert!(
            after >= driver_free as u64 + 240 * MIB,
            "the pool keeps nothing: {after} available, {driver_free} free"
        );
        Ok(())
    }

    /// The device's pool keeps everything freed afterwards (the threshold is
    /// read back from the driver). With `CHUNKED_CE_REQUIRE_CUDA=1` a missing
    /// GPU fails the test instead of skipping it.
    #[cfg(feature = "cuda")]
    #[test]
    fn raises_the_pools_release_threshold() -> candle::Result<()> {
        let _pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let Some(device) = cuda_device("raises_the_pools_release_threshold") else { return Ok(()) };
        super::cuda::set_release_threshold(0, 0)?;
        assert_eq!(super::cuda::release_threshold(0)?, 0);
        retain_freed_memory(&device)?;
        assert_eq!(super::cuda::release_threshold(0)?, u64::MAX);
        Ok(())
    }
}
