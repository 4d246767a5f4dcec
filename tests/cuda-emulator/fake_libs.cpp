// The CUDA libraries that candle links besides the driver, for the emulated
// GPU (see fake_driver.cpp). Compiled once per library with one of
// FAKE_CUBLAS, FAKE_CURAND, FAKE_CUDART defined; scripts/emulated-gpu.sh
// gives each the real soname and version node, so the references of a normal
// CUDA build resolve to them.
//
// - cuBLAS: the strided-batched GEMMs candle's matmul uses (f32, f64, f16,
//   and GemmEx for f16/bf16/f32/f64 inputs), column-major as cuBLAS, with a
//   plain triple loop accumulating in the compute type (f16 GEMMs in f32).
// - cuRAND: uniform and normal numbers from a SplitMix64 stream per
//   generator (seeded like cuRAND, not cuRAND's XORWOW sequence), with
//   cuRAND's rules: uniform in (0, 1], normal counts must be even.
// - The CUDA runtime: start-up registration only; nothing computes.
// Work on a stream first waits for that stream's pending collectives.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

// The emulated driver's (fake_driver.cpp).
extern "C" void syncbn_emu_drain(void* stream);
extern "C" int cuDeviceGetCount(int* count);

namespace {

#if defined(FAKE_CUBLAS)
// cudaDataType values.
constexpr int R_32F = 0, R_64F = 1, R_16F = 2, R_16BF = 14;

double load(const void* p, std::size_t i, int t) {
    switch (t) {
    case R_32F: return static_cast<const float*>(p)[i];
    case R_64F: return static_cast<const double*>(p)[i];
    case R_16F: return __half2float(static_cast<const __half*>(p)[i]);
    case R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return NAN;
    }
}

void store(void* p, std::size_t i, int t, double v) {
    switch (t) {
    case R_32F: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case R_64F: static_cast<double*>(p)[i] = v; break;
    case R_16F: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case R_16BF: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    default: break;
    }
}

bool known(int t) { return t == R_32F || t == R_64F || t == R_16F || t == R_16BF; }

// C = alpha·op(A)·op(B) + beta·C for each of `batch` matrices, column-major;
// `single` accumulates in f32 (else f64). With beta = 0, C is not read.
int gemm(void* handle, int ta, int tb, int m, int n, int k, double alpha, const void* a, int at, int lda,
         long long sa, const void* b, int bt, int ldb, long long sb, double beta, void* c, int ct, int ldc,
         long long sc, int batch, bool single) {
    constexpr int INVALID_VALUE = 7;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || ta < 0 || ta > 2 || tb < 0 || tb > 2) return INVALID_VALUE;
    if (lda < std::max(1, ta == 0 ? m : k) || ldb < std::max(1, tb == 0 ? k : n) || ldc < std::max(1, m))
        return INVALID_VALUE;
    syncbn_emu_drain(*static_cast<void**>(handle));
    for (int p = 0; p < batch; ++p) {
        const std::size_t oa = static_cast<std::size_t>(p) * sa, ob = static_cast<std::size_t>(p) * sb,
                          oc = static_cast<std::size_t>(p) * sc;
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                double acc = 0.0;
                float acc32 = 0.0f;
                for (int l = 0; l < k; ++l) {
                    const std::size_t ia = ta == 0 ? i + static_cast<std::size_t>(l) * lda : l + static_cast<std::size_t>(i) * lda;
                    const std::size_t ib = tb == 0 ? l + static_cast<std::size_t>(j) * ldb : j + static_cast<std::size_t>(l) * ldb;
                    const double x = load(a, oa + ia, at), y = load(b, ob + ib, bt);
                    if (single) acc32 += static_cast<float>(x) * static_cast<float>(y);
                    else acc += x * y;
                }
                const std::size_t ic = oc + i + static_cast<std::size_t>(j) * ldc;
                const double sum = single ? acc32 : acc;
                store(c, ic, ct, beta == 0.0 ? alpha * sum : alpha * sum + beta * load(c, ic, ct));
            }
    }
    return 0;
}
#endif

#if defined(FAKE_CURAND)
struct Generator {
    std::uint64_t state;
    void* stream;
};

std::uint64_t next(Generator* g) {
    std::uint64_t z = (g->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Uniform in (0, 1], as cuRAND's.
double uniform(Generator* g) { return (static_cast<double>(next(g) >> 11) + 1.0) / 9007199254740992.0; }

template <typename T> int fill_normal(Generator* g, T* out, std::size_t n, double mean, double std) {
    constexpr int LENGTH_NOT_MULTIPLE = 105;
    if (n % 2 != 0) return LENGTH_NOT_MULTIPLE;
    syncbn_emu_drain(g->stream);
    for (std::size_t i = 0; i < n; i += 2) {  // Box-Muller, two values per pair
        const double r = std::sqrt(-2.0 * std::log(uniform(g))), t = 2.0 * M_PI * uniform(g);
        out[i] = static_cast<T>(mean + std * r * std::cos(t));
        out[i + 1] = static_cast<T>(mean + std * r * std::sin(t));
    }
    return 0;
}

template <typename T> int fill_uniform(Generator* g, T* out, std::size_t n) {
    syncbn_emu_drain(g->stream);
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(uniform(g));
    return 0;
}
#endif

}  // namespace

extern "C" {

#if defined(FAKE_CUBLAS)
// A handle holds its stream.
int cublasCreate_v2(void** handle) {
    *handle = std::calloc(1, sizeof(void*));
    return 0;
}
int cublasDestroy_v2(void* handle) {
    std::free(handle);
    return 0;
}
int cublasSetStream_v2(void* handle, void* stream) {
    *static_cast<void**>(handle) = stream;
    return 0;
}
int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* a,
                              int lda, long long sa, const float* b, int ldb, long long sb, const float* beta,
                              float* c, int ldc, long long sc, int batch) {
    return gemm(h, ta, tb, m, n, k, *alpha, a, R_32F, lda, sa, b, R_32F, ldb, sb, *beta, c, R_32F, ldc, sc, batch,
                true);
}
int cublasDgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const double* alpha, const double* a,
                              int lda, long long sa, const double* b, int ldb, long long sb, const double* beta,
                              double* c, int ldc, long long sc, int batch) {
    return gemm(h, ta, tb, m, n, k, *alpha, a, R_64F, lda, sa, b, R_64F, ldb, sb, *beta, c, R_64F, ldc, sc, batch,
                false);
}
int cublasHgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const __half* alpha, const __half* a,
                              int lda, long long sa, const __half* b, int ldb, long long sb, const __half* beta,
                              __half* c, int ldc, long long sc, int batch) {
    return gemm(h, ta, tb, m, n, k, __half2float(*alpha), a, R_16F, lda, sa, b, R_16F, ldb, sb,
                __half2float(*beta), c, R_16F, ldc, sc, batch, true);
}
// alpha and beta are of the compute type: __half for CUBLAS_COMPUTE_16F(_PEDANTIC)
// (64, 65), double for CUBLAS_COMPUTE_64F(_PEDANTIC) (70, 71), else float.
int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
                               int at, int lda, long long sa, const void* b, int bt, int ldb, long long sb,
                               const void* beta, void* c, int ct, int ldc, long long sc, int batch, int compute,
                               int) {
    constexpr int NOT_SUPPORTED = 15;
    if (!known(at) || !known(bt) || !known(ct)) return NOT_SUPPORTED;
    double al, be;
    if (compute == 64 || compute == 65) {
        al = __half2float(*static_cast<const __half*>(alpha));
        be = __half2float(*static_cast<const __half*>(beta));
    } else if (compute == 70 || compute == 71) {
        al = *static_cast<const double*>(alpha);
        be = *static_cast<const double*>(beta);
    } else {
        al = *static_cast<const float*>(alpha);
        be = *static_cast<const float*>(beta);
    }
    return gemm(h, ta, tb, m, n, k, al, a, at, lda, sa, b, bt, ldb, sb, be, c, ct, ldc, sc, batch,
                !(compute == 70 || compute == 71));
}
#endif

#if defined(FAKE_CURAND)
int curandCreateGenerator(void** gen, int) {
    *gen = new Generator{0, nullptr};
    return 0;
}
int curandDestroyGenerator(void* gen) {
    delete static_cast<Generator*>(gen);
    return 0;
}
int curandSetPseudoRandomGeneratorSeed(void* gen, unsigned long long seed) {
    static_cast<Generator*>(gen)->state = seed;
    return 0;
}
int curandSetStream(void* gen, void* stream) {
    static_cast<Generator*>(gen)->stream = stream;
    return 0;
}
int curandGenerateNormal(void* gen, float* out, std::size_t n, float mean, float std) {
    return fill_normal(static_cast<Generator*>(gen), out, n, mean, std);
}
int curandGenerateNormalDouble(void* gen, double* out, std::size_t n, double mean, double std) {
    return fill_normal(static_cast<Generator*>(gen), out, n, mean, std);
}
int curandGenerateUniform(void* gen, float* out, std::size_t n) {
    return fill_uniform(static_cast<Generator*>(gen), out, n);
}
int curandGenerateUniformDouble(void* gen, double* out, std::size_t n) {
    return fill_uniform(static_cast<Generator*>(gen), out, n);
}
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
int cudaSetDevice(int dev) {
    int n = 0;
    cuDeviceGetCount(&n);
    return dev >= 0 && dev < n ? 0 : 101;
}
int cudaGetDeviceCount(int* n) { return cuDeviceGetCount(n); }
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
