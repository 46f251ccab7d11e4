// HIP-CPU's __half stands in for CUDA's (tests/kernels_on_cpu.rs only).
#pragma once
#include <hip/hip_fp16.h>
