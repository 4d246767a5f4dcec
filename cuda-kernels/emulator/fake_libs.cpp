// Shells of the CUDA libraries that candle links besides the driver, for the
// emulated GPU (see fake_driver.cpp). Compiled once per library with one of
// FAKE_CUBLAS, FAKE_CURAND, FAKE_CUDART defined; scripts/emulated-gpu.sh
// gives each the real soname and version node, so the references of a normal
// CUDA build resolve to them.
//
// Handle creation and stream binding succeed (candle creates a cuBLAS handle
// and a cuRAND generator when it opens a device); every computation reports
// "not supported", so a test that needs cuBLAS or cuRAND fails with an error.
#include <cstddef>
#include <cstdlib>

extern "C" {

#if defined(FAKE_CUBLAS)
constexpr int NOT_SUPPORTED = 15;  // CUBLAS_STATUS_NOT_SUPPORTED
int cublasCreate_v2(void** handle) {
    *handle = std::malloc(1);
    return 0;
}
int cublasDestroy_v2(void* handle) {
    std::free(handle);
    return 0;
}
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasDgemmStridedBatched() { return NOT_SUPPORTED; }
int cublasGemmStridedBatchedEx() { return NOT_SUPPORTED; }
int cublasSgemmStridedBatched() { return NOT_SUPPORTED; }
int cublasHgemmStridedBatched() { return NOT_SUPPORTED; }
#endif

#if defined(FAKE_CURAND)
constexpr int NOT_SUPPORTED = 201;  // CURAND_STATUS_LAUNCH_FAILURE
int curandCreateGenerator(void** gen, int) {
    *gen = std::malloc(1);
    return 0;
}
int curandDestroyGenerator(void* gen) {
    std::free(gen);
    return 0;
}
int curandSetPseudoRandomGeneratorSeed(void*, unsigned long long) { return 0; }
int curandSetStream(void*, void*) { return 0; }
int curandGenerateNormal() { return NOT_SUPPORTED; }
int curandGenerateNormalDouble() { return NOT_SUPPORTED; }
int curandGenerateUniform() { return NOT_SUPPORTED; }
int curandGenerateUniformDouble() { return NOT_SUPPORTED; }
#endif

#if defined(FAKE_CUDART)
// Fat binaries that nvcc-compiled host code registers at start-up (candle's
// own CUDA-runtime kernels): accepted and never launched.
static void* fatbin_handle[1];
void** __cudaRegisterFatBinary(void*) { return fatbin_handle; }
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char*, char*, const char*, int, void*, void*, void*, void*, int*) {}
void __cudaRegisterVar(void**, char*, char*, const char*, int, std::size_t, int, int) {}
constexpr int NOT_SUPPORTED = 801;  // cudaErrorNotSupported
unsigned __cudaPushCallConfiguration() { return NOT_SUPPORTED; }
int __cudaPopCallConfiguration() { return NOT_SUPPORTED; }
int __cudaGetKernel() { return NOT_SUPPORTED; }
int __cudaLaunchKernel_ptsz() { return NOT_SUPPORTED; }
int cudaGetDevice(int* dev) {
    *dev = 0;
    return 0;
}
int cudaSetDevice(int dev) { return dev == 0 ? 0 : 101; }
int cudaGetDeviceCount(int* n) {
    *n = 1;
    return 0;
}
int cudaGetLastError() { return 0; }
int cudaPeekAtLastError() { return 0; }
const char* cudaGetErrorName(int) { return "cudaErrorNotSupported"; }
const char* cudaGetErrorString(int) { return "not supported by the emulated GPU"; }
int cudaDeviceGetAttribute() { return NOT_SUPPORTED; }
int cudaMalloc() { return NOT_SUPPORTED; }
int cudaFree() { return NOT_SUPPORTED; }
int cudaMallocAsync_ptsz() { return NOT_SUPPORTED; }
int cudaFreeAsync_ptsz() { return NOT_SUPPORTED; }
int cudaMemsetAsync_ptsz() { return NOT_SUPPORTED; }
int cudaStreamSynchronize_ptsz() { return NOT_SUPPORTED; }
int cudaFuncGetAttributes() { return NOT_SUPPORTED; }
int cudaFuncSetAttribute() { return NOT_SUPPORTED; }
int cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags() { return NOT_SUPPORTED; }
#endif

}  // extern "C"
