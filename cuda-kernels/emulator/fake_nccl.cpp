// An emulated NCCL (libnccl.so.2) for the emulated GPU (fake_driver.cpp):
// communicators whose ranks are threads of one process, on the emulated
// devices, which share host memory. Built by scripts/emulated-gpu.sh.
//
// What it models, as NCCL does it:
// - ncclCommInitRank blocks until every rank of the clique has joined.
// - A collective is enqueued, not run: it returns at once and is pending on
//   the caller's stream (see emu_streams.h) until every rank has enqueued its
//   part; the last to arrive computes it for all. Later work on a stream, its
//   events and cuMemFree wait for it. Ranks that make different calls (or a
//   rank that never calls) leave it pending forever: a hang, as on a GPU.
// - ncclCommAbort releases the caller's part of its pending collectives
//   (their results are undefined); the other ranks' parts stay pending, but,
//   like a network transport that sees a peer's connections close,
//   ncclCommGetAsyncError of the other ranks reports ncclRemoteError.
// Sums are computed in f64 (f32 would do for the small counts of tests) and
// rounded once; NCCL's ring sums in the element type, so half-precision sums
// may differ in the last bits.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_streams.h"

extern "C" int cuCtxGetDevice(int* device);  // the emulated driver's

namespace {

// ncclResult_t, ncclDataType_t and ncclRedOp_t values of NCCL 2.30.
enum Result {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
};
enum DataType { Int8, Uint8, Int32, Uint32, Int64, Uint64, Float16, Float32, Float64, Bfloat16 };
enum RedOp { Sum, Prod, Max, Min, Avg };
constexpr int ID_BYTES = 128;

std::size_t type_size(int t) {
    switch (t) {
    case Int8: case Uint8: return 1;
    case Float16: case Bfloat16: return 2;
    case Int32: case Uint32: case Float32: return 4;
    case Int64: case Uint64: case Float64: return 8;
    default: return 0;
    }
}

double load(const void* p, std::size_t i, int t) {
    switch (t) {
    case Int8: return static_cast<const std::int8_t*>(p)[i];
    case Uint8: return static_cast<const std::uint8_t*>(p)[i];
    case Int32: return static_cast<const std::int32_t*>(p)[i];
    case Uint32: return static_cast<const std::uint32_t*>(p)[i];
    case Int64: return static_cast<double>(static_cast<const std::int64_t*>(p)[i]);
    case Uint64: return static_cast<double>(static_cast<const std::uint64_t*>(p)[i]);
    case Float16: return __half2float(static_cast<const __half*>(p)[i]);
    case Float32: return static_cast<const float*>(p)[i];
    case Float64: return static_cast<const double*>(p)[i];
    case Bfloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return 0.0;
    }
}

void store(void* p, std::size_t i, int t, double v) {
    switch (t) {
    case Int8: static_cast<std::int8_t*>(p)[i] = static_cast<std::int8_t>(v); break;
    case Uint8: static_cast<std::uint8_t*>(p)[i] = static_cast<std::uint8_t>(v); break;
    case Int32: static_cast<std::int32_t*>(p)[i] = static_cast<std::int32_t>(v); break;
    case Uint32: static_cast<std::uint32_t*>(p)[i] = static_cast<std::uint32_t>(v); break;
    case Int64: static_cast<std::int64_t*>(p)[i] = static_cast<std::int64_t>(v); break;
    case Uint64: static_cast<std::uint64_t*>(p)[i] = static_cast<std::uint64_t>(v); break;
    case Float16: static_cast<__half*>(p)[i] = __double2half(v); break;
    case Float32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case Float64: static_cast<double*>(p)[i] = v; break;
    case Bfloat16: static_cast<__nv_bfloat16*>(p)[i] = __double2bfloat16(v); break;
    default: break;
    }
}

struct Clique;

// One collective call of every rank (the seq-th call of each communicator).
struct Collective {
    std::mutex m;
    std::condition_variable cv;
    bool finished = false;        // computed for every rank
    std::vector<bool> released;   // per rank: its communicator was aborted
    // What the first rank asked for; a rank asking for something else never
    // matches (the collective hangs, as mismatched NCCL calls do).
    bool broadcast = false;
    std::size_t count = 0;
    int type = 0, op = 0, root = 0;
    bool mismatch = false;
    int arrived = 0;
    std::vector<const void*> send;
    std::vector<void*> recv;

    void finish() {
        {
            std::lock_guard<std::mutex> g(m);
            finished = true;
        }
        cv.notify_all();
    }
    void release(int rank) {
        {
            std::lock_guard<std::mutex> g(m);
            released[rank] = true;
        }
        cv.notify_all();
    }
};

// One rank's part of a collective: the work pending on that rank's stream.
struct Part : cuda_emulator::PendingWork {
    std::shared_ptr<Collective> c;
    int rank;
    Part(std::shared_ptr<Collective> c, int rank) : c(std::move(c)), rank(rank) {}
    bool done() override {
        std::lock_guard<std::mutex> g(c->m);
        return c->finished || c->released[rank];
    }
    void wait() override {
        std::unique_lock<std::mutex> g(c->m);
        c->cv.wait(g, [&] { return c->finished || c->released[rank]; });
    }
};

struct Clique {
    int nranks;
    std::mutex m;
    std::condition_variable cv;
    int joined = 0;
    std::vector<bool> taken;
    std::atomic<bool> peer_aborted{false};
    std::map<std::uint64_t, std::shared_ptr<Collective>> calls;  // by sequence number
};

struct Comm {
    std::shared_ptr<Clique> clique;
    int rank;
    int device;
    std::uint64_t seq = 0;
    std::atomic<bool> aborted{false};
    std::mutex mine_lock;
    std::vector<std::shared_ptr<Part>> mine;  // this rank's unfinished calls
};

std::mutex cliques_lock;
std::map<std::string, std::shared_ptr<Clique>> cliques;  // by unique id

thread_local std::string last_error;

Result fail(Result r, const std::string& msg) {
    last_error = "emulated NCCL: " + msg;
    return r;
}

std::string id_key(const char* id) { return std::string(id, ID_BYTES); }

// Computes a complete collective into every rank's receive buffer.
void compute(Collective& c, int nranks) {
    const std::size_t n = c.count;
    std::vector<double> out(n);
    if (c.broadcast) {
        for (std::size_t i = 0; i < n; ++i) out[i] = load(c.send[c.root], i, c.type);
    } else {
        for (std::size_t i = 0; i < n; ++i) {
            double acc = load(c.send[0], i, c.type);
            for (int r = 1; r < nranks; ++r) {
                const double v = load(c.send[r], i, c.type);
                switch (c.op) {
                case Sum: case Avg: acc += v; break;
                case Prod: acc *= v; break;
                case Max: acc = std::isnan(acc) ? acc : (std::isnan(v) ? v : std::max(acc, v)); break;
                case Min: acc = std::isnan(acc) ? acc : (std::isnan(v) ? v : std::min(acc, v)); break;
                default: break;
                }
            }
            out[i] = c.op == Avg ? acc / nranks : acc;
        }
    }
    for (int r = 0; r < nranks; ++r)
        for (std::size_t i = 0; i < n; ++i) store(c.recv[r], i, c.type, out[i]);
}

Result enqueue(Comm* comm, bool broadcast, const void* send, void* recv, std::size_t count, int type, int op,
               int root, void* stream) {
    if (comm == nullptr) return fail(ncclInvalidArgument, "null communicator");
    if (comm->aborted) return fail(ncclInvalidUsage, "the communicator was aborted");
    if (type_size(type) == 0) return fail(ncclInvalidArgument, "unsupported data type " + std::to_string(type));
    if (!broadcast && (op < Sum || op > Avg)) return fail(ncclInvalidArgument, "unsupported reduction");
    Clique& q = *comm->clique;
    if (broadcast && (root < 0 || root >= q.nranks)) return fail(ncclInvalidArgument, "root out of range");
    if (count > 0 && (send == nullptr || recv == nullptr)) return fail(ncclInvalidArgument, "null buffer");
    std::shared_ptr<Collective> c;
    bool last = false;
    {
        std::lock_guard<std::mutex> g(q.m);
        auto& slot = q.calls[comm->seq++];
        if (!slot) {
            slot = std::make_shared<Collective>();
            slot->broadcast = broadcast;
            slot->count = count;
            slot->type = type;
            slot->op = op;
            slot->root = root;
            slot->send.assign(q.nranks, nullptr);
            slot->recv.assign(q.nranks, nullptr);
            slot->released.assign(q.nranks, false);
        } else if (slot->broadcast != broadcast || slot->count != count || slot->type != type ||
                   (!broadcast && slot->op != op) || (broadcast && slot->root != root)) {
            slot->mismatch = true;
        }
        c = slot;
        c->send[comm->rank] = send;
        c->recv[comm->rank] = recv;
        last = ++c->arrived == q.nranks && !c->mismatch;
    }
    if (last) {
        compute(*c, q.nranks);
        c->finish();
    }
    auto part = std::make_shared<Part>(c, comm->rank);
    {
        std::lock_guard<std::mutex> g(comm->mine_lock);
        comm->mine.erase(std::remove_if(comm->mine.begin(), comm->mine.end(),
                                        [](const std::shared_ptr<Part>& x) { return x->done(); }),
                         comm->mine.end());
        comm->mine.push_back(part);
    }
    const std::shared_ptr<cuda_emulator::PendingWork> work = part;
    syncbn_emu_defer(stream, &work);
    return ncclSuccess;
}

}  // namespace

extern "C" {

Result ncclGetVersion(int* version) {
    *version = 23007;  // 2.30.7, the version cudarc's `nccl` feature binds
    return ncclSuccess;
}

Result ncclGetUniqueId(char* id) {
    static std::atomic<std::uint64_t> counter{0};
    std::memset(id, 0, ID_BYTES);
    std::snprintf(id, ID_BYTES, "syncbn-emulated-nccl pid %ld id %llu", static_cast<long>(getpid()),
                  static_cast<unsigned long long>(counter++));
    return ncclSuccess;
}

// The unique id is passed by value: 128 bytes.
struct UniqueId {
    char internal[ID_BYTES];
};

Result ncclCommInitRank(Comm** out, int nranks, UniqueId id, int rank) {
    if (out == nullptr || nranks < 1 || rank < 0 || rank >= nranks)
        return fail(ncclInvalidArgument, "invalid rank " + std::to_string(rank) + " of " + std::to_string(nranks));
    const std::string key = id_key(id.internal);
    const std::string here = "syncbn-emulated-nccl pid " + std::to_string(getpid()) + " ";
    if (key.compare(0, here.size(), here) != 0)
        return fail(ncclInvalidUsage, "the ranks of a communicator must be threads of one process");
    std::shared_ptr<Clique> q;
    {
        std::lock_guard<std::mutex> g(cliques_lock);
        auto& slot = cliques[key];
        if (!slot) {
            slot = std::make_shared<Clique>();
            slot->nranks = nranks;
            slot->taken.assign(nranks, false);
        }
        q = slot;
    }
    int device = 0;
    if (cuCtxGetDevice(&device) != 0) return fail(ncclUnhandledCudaError, "no current CUDA context");
    {
        std::unique_lock<std::mutex> g(q->m);
        if (q->nranks != nranks) return fail(ncclInvalidUsage, "ranks disagree on the number of ranks");
        if (q->taken[rank]) return fail(ncclInvalidUsage, "rank " + std::to_string(rank) + " joined twice");
        q->taken[rank] = true;
        ++q->joined;
        q->cv.notify_all();
        q->cv.wait(g, [&] { return q->joined == q->nranks; });
    }
    Comm* c = new Comm();
    c->clique = q;
    c->rank = rank;
    c->device = device;
    *out = c;
    return ncclSuccess;
}

Result ncclAllReduce(const void* send, void* recv, std::size_t count, int type, int op, Comm* comm,
                     void* stream) {
    return enqueue(comm, false, send, recv, count, type, op, 0, stream);
}

Result ncclBroadcast(const void* send, void* recv, std::size_t count, int type, int root, Comm* comm,
                     void* stream) {
    return enqueue(comm, true, send, recv, count, type, Sum, root, stream);
}

Result ncclCommGetAsyncError(Comm* comm, Result* err) {
    if (comm == nullptr || err == nullptr) return fail(ncclInvalidArgument, "null argument");
    *err = comm->clique->peer_aborted && !comm->aborted ? ncclRemoteError : ncclSuccess;
    return ncclSuccess;
}

// Releases this rank's pending collectives; the peers see ncclRemoteError.
// The communicator object stays allocated (a late query on it stays safe).
Result ncclCommAbort(Comm* comm) {
    if (comm == nullptr) return ncclSuccess;
    if (comm->aborted.exchange(true)) return ncclSuccess;
    comm->clique->peer_aborted = true;
    std::lock_guard<std::mutex> g(comm->mine_lock);
    for (const auto& part : comm->mine) part->c->release(comm->rank);
    comm->mine.clear();
    return ncclSuccess;
}

Result ncclCommDestroy(Comm* comm) { return ncclCommAbort(comm); }
Result ncclCommFinalize(Comm*) { return ncclSuccess; }

Result ncclCommCount(const Comm* comm, int* count) {
    *count = comm->clique->nranks;
    return ncclSuccess;
}
Result ncclCommUserRank(const Comm* comm, int* rank) {
    *rank = comm->rank;
    return ncclSuccess;
}
Result ncclCommCuDevice(const Comm* comm, int* device) {
    *device = comm->device;
    return ncclSuccess;
}

Result ncclGroupStart() { return ncclSuccess; }
Result ncclGroupEnd() { return ncclSuccess; }

const char* ncclGetErrorString(Result r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclInvalidArgument: return "invalid argument (emulated NCCL)";
    case ncclInvalidUsage: return "invalid usage (emulated NCCL)";
    case ncclRemoteError: return "remote process exited or there was a network error (emulated NCCL)";
    default: return "unhandled error (emulated NCCL)";
    }
}
const char* ncclGetLastError(Comm*) { return last_error.c_str(); }

}  // extern "C"
