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
/// it. A no-op on the CPU and on devices other than CUDA.
///
/// # Errors
/// The driver's, if it refuses to give the device's pool or to set it.
pub fn retain_freed_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle::DeviceLocation::Cuda { gpu_id } = device.location() {
        return cuda::set_release_threshold(gpu_id, u64::MAX);
    }
    let _ = device;
    Ok(())
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle::cuda_backend::cudarc::driver::sys;
    use candle::Result;

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
        let pool = default_pool(gpu_id)?;
        let mut value = 0u64;
        // SAFETY: as in `set_release_threshold`, reading the attribute into `value`.
        let rc = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut value as *mut u64).cast(),
            )
        };
        check(rc, "cuMemPoolGetAttribute(RELEASE_THRESHOLD)")?;
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
            candle::bail!("retain_freed_memory: {what} failed: {rc:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::retain_freed_memory;
    use candle::Device;

    #[test]
    fn a_no_op_on_the_cpu() -> candle::Result<()> {
        retain_freed_memory(&Device::Cpu)
    }

    /// The device's pool keeps everything freed afterwards (the threshold is
    /// read back from the driver). With `CHUNKED_CE_REQUIRE_CUDA=1` a missing
    /// GPU fails the test instead of skipping it.
    #[cfg(feature = "cuda")]
    #[test]
    fn raises_the_pools_release_threshold() -> candle::Result<()> {
        let device = match Device::new_cuda(0) {
            Ok(device) => device,
            Err(e) => {
                assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
                eprintln!("SKIP raises_the_pools_release_threshold: no CUDA device");
                return Ok(());
            }
        };
        super::cuda::set_release_threshold(0, 0)?;
        assert_eq!(super::cuda::release_threshold(0)?, 0);
        retain_freed_memory(&device)?;
        assert_eq!(super::cuda::release_threshold(0)?, u64::MAX);
        Ok(())
    }
}
