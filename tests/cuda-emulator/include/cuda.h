// Emulator stand-in for CUDA's <cuda.h>: only the toolkit version, as the
// kernels test it (CUDA 13.0, the pinned toolchain).
#pragma once

#define CUDA_VERSION 13000
