// An emulated CUDA device for tests on machines without a GPU: the subset of
// the CUDA driver API that candle, cudarc and this crate's ops use, with
// device memory in host memory and kernel launches run by the emulator
// (runtime.cpp) on kernels compiled for the host: this crate's, and candle's
// element-wise, cast, fill, reduction, indexing and convolution kernels.
//
// Built by scripts/emulated-gpu.sh into libcuda.so.1 (this file, runtime.cpp
// and the kernels), next to libcublas, libcurand and libcudart (fake_libs.cpp:
// cuBLAS's GEMMs, cuRAND's generators, a runtime shell) and the emulated NCCL
// (fake_nccl.cpp). With that folder first on LD_LIBRARY_PATH, an unmodified
// CUDA build of the tests opens "GPU 0" and runs the real launch code:
// cudarc argument passing, plans, allocations, copies, candle's tensor ops
// and autograd.
//
// Kernels and copies run when they are enqueued; the emulated NCCL's
// collectives stay pending on their stream until every rank has enqueued its
// part, and later work on that stream, its events and cuMemFree wait for
// them, as on the device (emu_streams.h). Modules ignore their PTX and
// resolve function names against the registry below; a kernel it does not
// have (candle's sorts and quantized kernels) is reported as not found, so a
// test that needs one fails with an error. What the device rejects, it
// rejects too: empty allocations, empty or oversized launches.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

// The emulated GPU runs the tests: with the kernels only they launch.
#define SYNCBN_TEST_KERNELS
#include "stats.cu"
#include "grad.cu"
#include "elementwise.cu"
#include "emu_streams.h"
#include "kernel_registry.h"

extern "C" int syncbn_emu_launch(const unsigned* grid, const unsigned* block, void (*body)(void*), void* data,
                                 char* err, std::size_t err_len);

namespace {

using CUresult = int;
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_INVALID_DEVICE = 101;
constexpr CUresult CUDA_ERROR_INVALID_CONTEXT = 201;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;
constexpr CUresult CUDA_ERROR_LAUNCH_FAILED = 719;

// --- kernel registry ------------------------------------------------------

using cuda_emulator::Kernel;

#define SYNCBN_TYPED(prefix) \
    SYNCBN_KERNEL(prefix##_f32), SYNCBN_KERNEL(prefix##_f64), SYNCBN_KERNEL(prefix##_f16), SYNCBN_KERNEL(prefix##_bf16)

// Every kernel by name: this crate's, then candle's (registered at load time
// by the generated candle_*.cpp files, see scripts/emulated-gpu.sh).
std::unordered_map<std::string, Kernel>& registry() {
    static std::unordered_map<std::string, Kernel> r = {
        SYNCBN_TYPED(bn_stats_major),
        SYNCBN_TYPED(bn_stats_major_scalar),
        SYNCBN_KERNEL(bn_stats_major_half_f16),
        SYNCBN_KERNEL(bn_stats_major_half_bf16),
        SYNCBN_TYPED(bn_stats_inner),
        SYNCBN_TYPED(bn_stats_inner_scalar),
        SYNCBN_KERNEL(bn_stats_combine),
        SYNCBN_KERNEL(bn_moments_from_sums),
        SYNCBN_KERNEL(bn_moments_from_running),
        SYNCBN_KERNEL(bn_running_update),
        SYNCBN_KERNEL(bn_counter_increment),
        SYNCBN_KERNEL(bn_batch_moments),
        SYNCBN_TYPED(bn_grad_major),
        SYNCBN_TYPED(bn_grad_major_scalar),
        SYNCBN_KERNEL(bn_grad_major_half_f16),
        SYNCBN_KERNEL(bn_grad_major_half_bf16),
        SYNCBN_TYPED(bn_grad_inner),
        SYNCBN_TYPED(bn_grad_inner_scalar),
        SYNCBN_TYPED(bn_grad_relu_major),
        SYNCBN_TYPED(bn_grad_relu_major_scalar),
        SYNCBN_KERNEL(bn_grad_relu_major_half_f16),
        SYNCBN_KERNEL(bn_grad_relu_major_half_bf16),
        SYNCBN_TYPED(bn_grad_relu_inner),
        SYNCBN_TYPED(bn_grad_relu_inner_scalar),
        SYNCBN_TYPED(bn_affine_grads),
        SYNCBN_KERNEL(bn_grad_combine),
        SYNCBN_KERNEL(bn_grad_combine_affine),
        SYNCBN_KERNEL(bn_coef_normalize_f32),
        SYNCBN_KERNEL(bn_coef_normalize_f64),
        SYNCBN_KERNEL(bn_coef_input_grad_f32),
        SYNCBN_KERNEL(bn_coef_input_grad_f64),
        SYNCBN_KERNEL(bn_stack_params),
        SYNCBN_TYPED(bn_normalize),
        SYNCBN_TYPED(bn_normalize_add),
        SYNCBN_TYPED(bn_input_grad),
        SYNCBN_TYPED(bn_normalize_rows),
        SYNCBN_TYPED(bn_normalize_add_rows),
        SYNCBN_TYPED(bn_input_grad_rows),
        SYNCBN_TYPED(bn_relu_grad),
    };
    return r;
}

// Live device allocations: the start handed out -> the mapping behind it.
struct Mapping {
    void* base;
    std::size_t len;
};
std::mutex allocations_lock;
std::unordered_map<void*, Mapping> allocations;

// Devices the emulated machine has: SYNCBN_EMU_DEVICES (1 to 8), default 4,
// so that multi-GPU code (one rank per GPU) runs; they share host memory.
constexpr int MAX_DEVICES = 8;
int device_count() {
    static const int n = [] {
        const char* v = std::getenv("SYNCBN_EMU_DEVICES");
        const int k = v ? std::atoi(v) : 0;
        return k >= 1 && k <= MAX_DEVICES ? k : 4;
    }();
    return n;
}

// Handles are addresses of these markers (never dereferenced by callers).
char contexts[MAX_DEVICES], the_module;
thread_local void* current_context = nullptr;

// --- deferred work (see emu_streams.h) -------------------------------------

using Work = std::shared_ptr<cuda_emulator::PendingWork>;

// Pending work per (context, stream): every rank of a test may use the null
// stream of its own device.
std::mutex pending_lock;
std::map<std::pair<void*, void*>, std::vector<Work>> pending;

std::pair<void*, void*> stream_key(void* stream) { return {current_context, stream}; }

// Waits until the pending work of the streams that `pick` selects is done.
// Work stays listed until it is done, so that every thread that drains a
// stream waits for all of it (threads of several tests may share a device's
// null stream, as on a GPU).
template <typename Pick> void drain_where(Pick pick) {
    for (;;) {
        Work w;
        {
            std::lock_guard<std::mutex> g(pending_lock);
            for (auto it = pending.begin(); it != pending.end() && !w;) {
                if (it->second.empty()) {
                    it = pending.erase(it);
                } else {
                    if (pick(it->first)) w = it->second.front();
                    ++it;
                }
            }
        }
        if (!w) return;
        w->wait();
        std::lock_guard<std::mutex> g(pending_lock);
        for (auto& [key, list] : pending)
            for (auto it = list.begin(); it != list.end(); ++it)
                if (*it == w) {
                    list.erase(it);
                    break;
                }
    }
}

// Waits for the pending work of `stream` (of the current context).
void drain(void* stream) {
    const auto key = stream_key(stream);
    drain_where([&](const std::pair<void*, void*>& k) { return k == key; });
}

// Waits for the pending work of every stream of the current context (the
// implicit synchronization of cuMemFree and cuCtxSynchronize).
void drain_context() {
    void* const ctx = current_context;
    drain_where([&](const std::pair<void*, void*>& k) { return k.first == ctx; });
}

// Calls of this OS thread that make the host wait for the device: stream,
// context and event synchronization, device-to-host copies (into pageable
// memory they return when the copy is done), synchronous frees. Read by the
// tests through syncbn_emu_host_syncs.
thread_local unsigned long long host_syncs = 0;

// Device-to-host copies made by this OS thread (each is also a host sync):
// read by the tests through syncbn_emu_dtoh_copies.
thread_local unsigned long long dtoh_copies = 0;

// Launches of this crate's kernels (named bn_*) made by this OS thread: the
// tests read the launch profile of a training step through
// syncbn_emu_crate_launches.
thread_local unsigned long long crate_launches = 0;

// Launches of each kernel made by this OS thread: the tests read how often
// kernels of a name prefix ran through syncbn_emu_launches_named.
thread_local std::unordered_map<const Kernel*, unsigned long long> launches_by_kernel;

// An event: the work pending on its stream when it was recorded.
struct Event {
    std::vector<Work> before;
};

struct Launch {
    const Kernel* k;
    void** params;
};

void run_thread(void* data) {
    const Launch* l = static_cast<const Launch*>(data);
    l->k->invoke(l->k->fn, l->params);
}

bool trace() {
    static const bool on = std::getenv("SYNCBN_EMU_TRACE") != nullptr;
    return on;
}

// Whether `k` is one of this crate's kernels (bn_*), not candle's. Every
// kernel is registered before main (static initializers), so the set is
// complete when the first launch builds it.
bool is_crate_kernel(const Kernel* k) {
    static const std::unordered_set<const Kernel*> ours = [] {
        std::unordered_set<const Kernel*> s;
        for (const auto& [name, kernel] : registry())
            if (name.rfind("bn_", 0) == 0) s.insert(&kernel);
        return s;
    }();
    return ours.count(k) != 0;
}

}  // namespace

bool cuda_emulator::register_kernels(std::initializer_list<std::pair<const char*, Kernel>> kernels) {
    auto& r = registry();
    for (const auto& [name, k] : kernels) r.emplace(name, k);
    return true;
}

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }

CUresult cuDeviceGet(int* dev, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* count) {
    *count = device_count();
    return CUDA_SUCCESS;
}

// Multiprocessors the device reports: SYNCBN_EMU_SMS, default 132 (an H100),
// so that the plans make the grids they make on the target GPU (more chunks
// per channel, blocks that find no work); a small count runs faster.
int sm_count() {
    static const int n = [] {
        const char* v = std::getenv("SYNCBN_EMU_SMS");
        const int k = v ? std::atoi(v) : 0;
        return k > 0 ? k : 132;
    }();
    return n;
}

// An H100-like device (sm_90) without memory pools.
CUresult cuDeviceGetAttribute(int* value, int attrib, int dev) {
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    switch (attrib) {
    case 16: *value = sm_count(); break;  // MULTIPROCESSOR_COUNT
    case 75: *value = 9; break;   // COMPUTE_CAPABILITY_MAJOR
    case 76: *value = 0; break;   // COMPUTE_CAPABILITY_MINOR
    case 1: *value = 1024; break; // MAX_THREADS_PER_BLOCK
    case 10: *value = 32; break;  // WARP_SIZE
    case 115: *value = 1; break;  // MEMORY_POOLS_SUPPORTED: stream-ordered alloc/free, as an H100
    default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &contexts[dev];
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void* ctx) {
    current_context = ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = current_context;
    return CUDA_SUCCESS;
}
CUresult cuCtxDestroy_v2(void*) { return CUDA_SUCCESS; }
CUresult cuCtxSynchronize() {
    ++host_syncs;
    drain_context();
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(int* dev) {
    if (current_context == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = static_cast<int>(static_cast<char*>(current_context) - contexts);
    return CUDA_SUCCESS;
}

CUresult cuStreamDestroy_v2(void*) { return CUDA_SUCCESS; }
CUresult cuStreamIsCapturing(void*, int* status) {
    *status = 0;  // CU_STREAM_CAPTURE_STATUS_NONE
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* stream) {
    ++host_syncs;
    drain(stream);
    return CUDA_SUCCESS;
}
CUresult cuStreamWaitEvent(void* stream, void* ev, unsigned) {
    const Event* e = static_cast<const Event*>(ev);
    if (e->before.empty()) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> g(pending_lock);
    auto& list = pending[stream_key(stream)];
    list.insert(list.end(), e->before.begin(), e->before.end());
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(void** ev, unsigned) {
    *ev = new Event();
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* ev, void* stream) {
    Event* e = static_cast<Event*>(ev);
    std::lock_guard<std::mutex> g(pending_lock);
    const auto it = pending.find(stream_key(stream));
    e->before = it == pending.end() ? std::vector<Work>{} : it->second;
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(void* ev) {
    for (const Work& w : static_cast<Event*>(ev)->before)
        if (!w->done()) return CUDA_ERROR_NOT_READY;
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(void* ev) {
    ++host_syncs;
    for (const Work& w : static_cast<Event*>(ev)->before) w->wait();
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void* ev) {
    delete static_cast<Event*>(ev);
    return CUDA_SUCCESS;
}

void syncbn_emu_drain(void* stream) { drain(stream); }

unsigned long long syncbn_emu_host_syncs() { return host_syncs; }

unsigned long long syncbn_emu_dtoh_copies() { return dtoh_copies; }

unsigned long long syncbn_emu_crate_launches() { return crate_launches; }

unsigned long long syncbn_emu_launches_named(const char* prefix) {
    unsigned long long n = 0;
    for (const auto& [name, k] : registry())
        if (name.rfind(prefix, 0) == 0) {
            const auto it = launches_by_kernel.find(&k);
            if (it != launches_by_kernel.end()) n += it->second;
        }
    return n;
}

void syncbn_emu_defer(void* stream, const Work* work) {
    std::lock_guard<std::mutex> g(pending_lock);
    pending[stream_key(stream)].push_back(*work);
}

// Device memory is host memory: each allocation is 256-byte aligned like
// cudaMalloc's and ends less than 256 bytes before an inaccessible page, so a
// kernel that runs past the end of a buffer faults there instead of silently
// corrupting the heap. As on the device, an empty allocation is an error.
CUresult cuMemAlloc_v2(std::uint64_t* dptr, std::size_t bytes) {
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t rounded = (bytes + 255) / 256 * 256;
    const std::size_t data = (rounded + page - 1) / page * page;
    void* base = mmap(nullptr, data + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    mprotect(static_cast<char*>(base) + data, page, PROT_NONE);
    char* p = static_cast<char*>(base) + (data - rounded);
    {
        std::lock_guard<std::mutex> g(allocations_lock);
        allocations[p] = Mapping{base, data + page};
    }
    *dptr = reinterpret_cast<std::uintptr_t>(p);
    return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(std::uint64_t* dptr, std::size_t bytes, void*) { return cuMemAlloc_v2(dptr, bytes); }
// One memory pool per device, whose attributes are only stored (allocations
// map and unmap at once whatever the release threshold): enough for
// candle_syncbn::cuda_memory to set and read them back.
static std::uint64_t pool_attributes[8][9];
CUresult cuDeviceGetMemPool(void** pool, int dev) {
    if (dev < 0 || dev >= device_count() || dev >= 8) return CUDA_ERROR_INVALID_DEVICE;
    *pool = pool_attributes[dev];
    return CUDA_SUCCESS;
}
static std::uint64_t* pool_attribute(void* pool, int attr) {
    for (auto& p : pool_attributes)
        if (pool == p && attr >= 1 && attr <= 8) return &p[attr];
    return nullptr;
}
// Only RELEASE_THRESHOLD (4) and the other u64 attributes (5-8) are 64-bit;
// 1-3 are ints.
CUresult cuMemPoolSetAttribute(void* pool, int attr, void* value) {
    std::uint64_t* slot = pool_attribute(pool, attr);
    if (!slot || !value) return CUDA_ERROR_INVALID_VALUE;
    *slot = attr >= 4 ? *static_cast<std::uint64_t*>(value) : static_cast<std::uint64_t>(*static_cast<int*>(value));
    return CUDA_SUCCESS;
}
CUresult cuMemPoolGetAttribute(void* pool, int attr, void* value) {
    std::uint64_t* slot = pool_attribute(pool, attr);
    if (!slot || !value) return CUDA_ERROR_INVALID_VALUE;
    if (attr >= 4)
        *static_cast<std::uint64_t*>(value) = *slot;
    else
        *static_cast<int*>(value) = static_cast<int>(*slot);
    return CUDA_SUCCESS;
}
// Unmaps an allocation (its pending work is done).
static CUresult release(std::uint64_t dptr) {
    Mapping m{};
    {
        std::lock_guard<std::mutex> g(allocations_lock);
        const auto it = allocations.find(reinterpret_cast<void*>(dptr));
        if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
        m = it->second;
        allocations.erase(it);
    }
    munmap(m.base, m.len);
    return CUDA_SUCCESS;
}

// Stream-ordered frees whose stream had pending work: each goes once the
// work pending before it is done (checked at later frees and synchronizations).
struct DeferredFree {
    std::uint64_t dptr;
    std::vector<Work> before;
};
std::vector<DeferredFree> deferred_frees;  // under pending_lock

bool all_done(const std::vector<Work>& works) {
    for (const Work& w : works)
        if (!w->done()) return false;
    return true;
}

// Frees the deferred allocations whose earlier work is done. (done() takes
// the emulated NCCL's locks: never called under pending_lock.)
void sweep_deferred_frees() {
    std::vector<DeferredFree> candidates;
    {
        std::lock_guard<std::mutex> g(pending_lock);
        candidates.swap(deferred_frees);
    }
    std::vector<DeferredFree> keep;
    for (DeferredFree& f : candidates) {
        if (all_done(f.before)) {
            release(f.dptr);
        } else {
            keep.push_back(std::move(f));
        }
    }
    std::lock_guard<std::mutex> g(pending_lock);
    for (DeferredFree& f : keep) deferred_frees.push_back(std::move(f));
}

CUresult cuMemFree_v2(std::uint64_t dptr) {
    ++host_syncs;     // cuMemFree waits for the device
    drain_context();
    sweep_deferred_frees();
    return release(dptr);
}

// Stream-ordered: the memory goes when the stream's earlier work is done; the
// host does not wait for it (a collective pending on the stream defers it).
CUresult cuMemFreeAsync(std::uint64_t dptr, void* stream) {
    sweep_deferred_frees();
    std::vector<Work> before;
    {
        std::lock_guard<std::mutex> g(pending_lock);
        const auto it = pending.find(stream_key(stream));
        if (it != pending.end()) before = it->second;
    }
    if (all_done(before)) return release(dptr);
    std::lock_guard<std::mutex> g(pending_lock);
    deferred_frees.push_back(DeferredFree{dptr, std::move(before)});
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(std::uint64_t dst, const void* src, std::size_t n, void* stream) {
    drain(stream);
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, std::uint64_t src, std::size_t n, void* stream) {
    ++host_syncs;  // into pageable memory, it returns when the copy is done
    ++dtoh_copies;
    drain(stream);
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(std::uint64_t dst, std::uint64_t src, std::size_t n, void* stream) {
    drain(stream);
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyPeerAsync(std::uint64_t dst, void*, std::uint64_t src, void*, std::size_t n, void* stream) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, stream);
}
CUresult cuMemsetD8Async(std::uint64_t dst, unsigned char v, std::size_t n, void* stream) {
    drain(stream);
    std::memset(reinterpret_cast<void*>(dst), v, n);
    return CUDA_SUCCESS;
}

// Modules: the PTX is not read; functions come from the registry.
CUresult cuModuleLoadData(void** module, const void*) {
    *module = &the_module;
    return CUDA_SUCCESS;
}
CUresult cuModuleLoad(void** module, const char*) { return cuModuleLoadData(module, nullptr); }
CUresult cuModuleUnload(void*) { return CUDA_SUCCESS; }

CUresult cuModuleGetFunction(void** fn, void*, const char* name) {
    const auto& r = registry();
    const auto it = r.find(name);
    if (it == r.end()) {
        std::fprintf(stderr, "[emulated GPU] no kernel `%s` (candle-syncbn's and candle's element-wise, "
                     "reduction and indexing kernels are emulated)\n", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    *fn = const_cast<Kernel*>(&it->second);
    return CUDA_SUCCESS;
}

// Resident blocks per multiprocessor: the emulator has no registers to run
// out of, so as many blocks as 2048 threads make (8 of 256), the most a
// device of compute capability 8.0 to 12.x holds.
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, void* fn, int block_size,
                                                              std::size_t dynamic_smem, unsigned) {
    if (blocks == nullptr || fn == nullptr || block_size <= 0 || block_size > 1024 || dynamic_smem != 0)
        return CUDA_ERROR_INVALID_VALUE;
    *blocks = 2048 / block_size;
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void* stream, void** params, void** extra) {
    if (fn == nullptr || params == nullptr || extra != nullptr || shared_bytes != 0) return CUDA_ERROR_INVALID_VALUE;
    // Like the device: an empty grid or block, or more than 1024 threads per
    // block, is an invalid launch, not a no-op.
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 ||
        static_cast<unsigned long long>(bx) * by * bz > 1024) {
        std::fprintf(stderr, "[emulated GPU] invalid launch: grid (%u, %u, %u), block (%u, %u, %u)\n", gx, gy, gz, bx,
                     by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    drain(stream);
    const unsigned grid[3] = {gx, gy, gz};
    const unsigned block[3] = {bx, by, bz};
    Launch l{static_cast<const Kernel*>(fn), params};
    if (is_crate_kernel(l.k)) ++crate_launches;
    ++launches_by_kernel[l.k];
    if (trace()) {
        for (const auto& [name, k] : registry())
            if (&k == l.k) std::fprintf(stderr, "[emulated GPU] %s <<<(%u,%u,%u), (%u,%u,%u)>>>\n", name.c_str(), gx, gy, gz, bx, by, bz);
    }
    char err[512] = {0};
    if (syncbn_emu_launch(grid, block, run_thread, &l, err, sizeof err) != 0) {
        std::fprintf(stderr, "[emulated GPU] launch failed: %s\n", err);
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(int e, const char** s) {
    switch (e) {
    case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found (emulated GPU: a kernel it does not emulate)"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *s = "launch failed in the emulated GPU (see stderr)"; break;
    default: *s = "emulated GPU: unsupported call"; break;
    }
    return CUDA_SUCCESS;
}

}  // extern "C"
