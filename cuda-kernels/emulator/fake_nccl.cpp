// An emulated NCCL (libnccl.so.2) for the emulated GPU (fake_driver.cpp):
// communicators of ranks on one machine, threads of one process or separate
// processes (one per emulated GPU, as the launcher starts them). Built by
// scripts/emulated-gpu.sh.
//
// The ranks meet in POSIX shared memory (/dev/shm): a clique's header (a
// process-shared mutex and condition variable, who joined, and a ring of
// RING collective slots), and one object per collective that holds every
// rank's contribution and the result. Names are unlinked as soon as every
// rank has opened them.
//
// What it models, as NCCL does it:
// - ncclCommInitRank blocks until every rank of the clique has joined.
// - ncclCommSplit blocks until every rank of the communicator has called it,
//   then each color's ranks join a clique of their own, ranked by key.
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
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
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

constexpr int MAX_RANKS = 64;
constexpr int RING = 256;  // collectives a rank may run ahead of the slowest

// A collective slot of the ring (the seq-th call of each communicator).
struct Slot {
    std::uint64_t seq;
    int used;
    // What the first rank asked for; a rank asking for something else never
    // matches (the collective hangs, as mismatched NCCL calls do).
    int broadcast, type, op, root;
    std::uint64_t count;
    int mismatch;
    int arrived;   // ranks whose contribution is in the data object
    int finished;  // the result is in the data object
    int consumed;  // ranks that copied the result out; at nranks the slot is free
};

// A clique's header in shared memory.
struct Shared {
    std::atomic<int> ready;  // 1 once the creator has initialized the rest
    pthread_mutex_t m;
    pthread_cond_t cv;
    int nranks;
    int joined;
    int taken[MAX_RANKS];
    int aborted;  // some rank aborted its communicator
    Slot slots[RING];
    // ncclCommSplit: every rank posts its color and key, then reads all.
    int split_round;     // splits completed on this clique
    int split_arrived;   // ranks that posted in the current round
    int split_departed;  // ranks that read the current round
    int split_color[MAX_RANKS];
    int split_key[MAX_RANKS];
};

struct Comm {
    Shared* sh;
    std::string name;  // the header's shared-memory name
    int rank;
    int device;
    std::uint64_t seq = 0;
    std::atomic<bool> aborted{false};
};

// Locks the clique's mutex; a process that died holding it leaves it
// recoverable (robust mutex).
struct Lock {
    Shared* sh;
    explicit Lock(Shared* s) : sh(s) {
        if (pthread_mutex_lock(&sh->m) == EOWNERDEAD) pthread_mutex_consistent(&sh->m);
    }
    ~Lock() { pthread_mutex_unlock(&sh->m); }
    void wait() {
        if (pthread_cond_wait(&sh->cv, &sh->m) == EOWNERDEAD) pthread_mutex_consistent(&sh->m);
    }
};

thread_local std::string last_error;

Result fail(Result r, const std::string& msg) {
    last_error = "emulated NCCL: " + msg;
    return r;
}

// The shared-memory name of the clique with unique id `id`.
std::string clique_name(const char* id) {
    std::string n = "/syncbn-emu-nccl";
    for (int i = 0; i < ID_BYTES && id[i] != '\0'; ++i) {
        const char c = id[i];
        n += (std::isalnum(static_cast<unsigned char>(c)) ? c : '-');
    }
    return n;
}

std::string data_name(const Comm& c, std::uint64_t seq) { return c.name + "-" + std::to_string(seq); }

// Maps `bytes` of the shared-memory object `name`, creating it (zeroed) when
// `create`, else waiting until it exists with that size (giving up when
// `*give_up` becomes non-zero, or after a minute).
void* map_shared(const std::string& name, std::size_t bytes, bool create, const int* give_up = nullptr) {
    int fd = -1;
    for (int tries = 0; fd < 0; ++tries) {
        fd = shm_open(name.c_str(), O_RDWR | (create ? O_CREAT : 0), 0600);
        if (fd < 0) {
            if (create || errno != ENOENT || tries > 60000) return nullptr;
            if (give_up != nullptr && __atomic_load_n(give_up, __ATOMIC_ACQUIRE) != 0) return nullptr;
            usleep(1000);
        }
    }
    if (create && ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        close(fd);
        return nullptr;
    }
    struct stat st;
    for (int tries = 0; fstat(fd, &st) == 0 && static_cast<std::size_t>(st.st_size) < bytes; ++tries) {
        if (tries > 60000) {
            close(fd);
            return nullptr;
        }
        usleep(1000);
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? nullptr : p;
}

// One rank's part of a collective: the work pending on that rank's stream.
// The result is copied into the rank's receive buffer when the rank waits.
// A part with slot -1 never finishes (enqueued after a rank aborted: the
// clique is dead, as the peers' ncclRemoteError says).
struct Part : cuda_emulator::PendingWork {
    Comm* comm;
    int slot;
    std::uint64_t seq;
    unsigned char* data;  // the collective's data object: nranks contributions, then the result
    std::size_t bytes;    // of one contribution
    void* recv;
    bool copied = false;

    Part(Comm* c, int slot, std::uint64_t seq, unsigned char* data, std::size_t bytes, void* recv)
        : comm(c), slot(slot), seq(seq), data(data), bytes(bytes), recv(recv) {}
    ~Part() override {
        if (data != nullptr) munmap(data, bytes * (comm->sh->nranks + 1));
    }
    bool finished() const {
        if (slot < 0) return false;
        const Slot& s = comm->sh->slots[slot];
        return s.used && s.seq == seq && s.finished;
    }
    bool done() override {
        Lock g(comm->sh);
        return copied || finished() || comm->aborted;
    }
    void wait() override {
        Lock g(comm->sh);
        while (!copied && !finished() && !comm->aborted) g.wait();
        if (copied || !finished()) return;  // released by an abort: the result is undefined
        if (bytes > 0) std::memcpy(recv, data + bytes * comm->sh->nranks, bytes);
        copied = true;
        Slot& s = comm->sh->slots[slot];
        if (++s.consumed == comm->sh->nranks) {
            s.used = 0;
            pthread_cond_broadcast(&comm->sh->cv);
        }
    }
};

// Computes a collective whose contributions are all in `data`.
void compute(const Slot& s, unsigned char* data, std::size_t bytes, int nranks) {
    const std::size_t n = s.count;
    unsigned char* out = data + bytes * nranks;
    for (std::size_t i = 0; i < n; ++i) {
        double acc;
        if (s.broadcast) {
            acc = load(data + bytes * s.root, i, s.type);
        } else {
            acc = load(data, i, s.type);
            for (int r = 1; r < nranks; ++r) {
                const double v = load(data + bytes * r, i, s.type);
                switch (s.op) {
                case Sum: case Avg: acc += v; break;
                case Prod: acc *= v; break;
                case Max: acc = std::isnan(acc) ? acc : (std::isnan(v) ? v : std::max(acc, v)); break;
                case Min: acc = std::isnan(acc) ? acc : (std::isnan(v) ? v : std::min(acc, v)); break;
                default: break;
                }
            }
            if (s.op == Avg) acc /= nranks;
        }
        store(out, i, s.type, acc);
    }
}

Result enqueue(Comm* comm, bool broadcast, const void* send, void* recv, std::size_t count, int type, int op,
               int root, void* stream) {
    if (comm == nullptr) return fail(ncclInvalidArgument, "null communicator");
    if (comm->aborted) return fail(ncclInvalidUsage, "the communicator was aborted");
    if (type_size(type) == 0) return fail(ncclInvalidArgument, "unsupported data type " + std::to_string(type));
    if (!broadcast && (op < Sum || op > Avg)) return fail(ncclInvalidArgument, "unsupported reduction");
    Shared* sh = comm->sh;
    if (broadcast && (root < 0 || root >= sh->nranks)) return fail(ncclInvalidArgument, "root out of range");
    if (count > 0 && (send == nullptr || recv == nullptr)) return fail(ncclInvalidArgument, "null buffer");
    const std::uint64_t seq = comm->seq++;
    const int k = static_cast<int>(seq % RING);
    const std::size_t bytes = count * type_size(type);
    const std::size_t total = bytes * (sh->nranks + 1);
    bool first = false, matches = true;
    const auto dead = [&] {
        const std::shared_ptr<cuda_emulator::PendingWork> work =
            std::make_shared<Part>(comm, -1, seq, nullptr, bytes, recv);
        syncbn_emu_defer(stream, &work);
        return ncclSuccess;
    };
    {
        Lock g(sh);
        if (sh->aborted) return dead();
        // Wait while an older collective still holds the slot (this rank is
        // RING collectives ahead of another).
        while (sh->slots[k].used && sh->slots[k].seq != seq && !comm->aborted) g.wait();
        if (comm->aborted) return fail(ncclInvalidUsage, "the communicator was aborted");
        Slot& s = sh->slots[k];
        if (!s.used) {
            s = Slot{seq, 1, broadcast, type, broadcast ? Sum : op, root, count, 0, 0, 0, 0};
            first = true;
        } else if (s.broadcast != static_cast<int>(broadcast) || s.count != count || s.type != type ||
                   (!broadcast && s.op != op) || (broadcast && s.root != root)) {
            s.mismatch = 1;
            matches = false;
        }
    }
    unsigned char* data = nullptr;
    if (matches && total > 0) {
        // The first rank creates the data object; the others wait for it.
        data = static_cast<unsigned char*>(map_shared(data_name(*comm, seq), total, first, &sh->aborted));
        if (data == nullptr) {
            if (__atomic_load_n(&sh->aborted, __ATOMIC_ACQUIRE) != 0) return dead();
            return fail(ncclSystemError, "cannot map the shared memory of a collective");
        }
        if (bytes > 0) std::memcpy(data + bytes * comm->rank, send, bytes);
    }
    {
        Lock g(sh);
        Slot& s = sh->slots[k];
        if (matches && ++s.arrived == sh->nranks && !s.mismatch) {
            if (data != nullptr) compute(s, data, bytes, sh->nranks);
            s.finished = 1;
            shm_unlink(data_name(*comm, seq).c_str());  // every rank has it mapped
            pthread_cond_broadcast(&sh->cv);
        }
    }
    const std::shared_ptr<cuda_emulator::PendingWork> work = std::make_shared<Part>(comm, k, seq, data, bytes, recv);
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
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    std::memset(id, 0, ID_BYTES);
    std::snprintf(id, ID_BYTES, "syncbn-emulated-nccl %ld %lld %ld %llu", static_cast<long>(getpid()),
                  static_cast<long long>(t.tv_sec), static_cast<long>(t.tv_nsec),
                  static_cast<unsigned long long>(counter++));
    return ncclSuccess;
}

// The unique id is passed by value: 128 bytes.
struct UniqueId {
    char internal[ID_BYTES];
};

}  // extern "C"

namespace {

// Joins (creating it if first) the clique `name` of `nranks` ranks as `rank`;
// returns when every rank has joined.
Result join_clique(Comm** out, const std::string& name, int nranks, int rank, int device) {
    // The first rank to arrive creates and initializes the header.
    Shared* sh = nullptr;
    const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd >= 0) {
        close(fd);
        sh = static_cast<Shared*>(map_shared(name, sizeof(Shared), true));
        if (sh == nullptr) return fail(ncclSystemError, "cannot map the clique's shared memory");
        pthread_mutexattr_t ma;
        pthread_mutexattr_init(&ma);
        pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&sh->m, &ma);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setpshared(&ca, PTHREAD_PROCESS_SHARED);
        pthread_cond_init(&sh->cv, &ca);
        sh->nranks = nranks;
        sh->ready.store(1, std::memory_order_release);
    } else {
        sh = static_cast<Shared*>(map_shared(name, sizeof(Shared), false));
        if (sh == nullptr) return fail(ncclSystemError, "cannot map the clique's shared memory");
        while (sh->ready.load(std::memory_order_acquire) != 1) usleep(100);
    }
    {
        Lock g(sh);
        if (sh->nranks != nranks) return fail(ncclInvalidUsage, "ranks disagree on the number of ranks");
        if (sh->taken[rank]) return fail(ncclInvalidUsage, "rank " + std::to_string(rank) + " joined twice");
        sh->taken[rank] = 1;
        if (++sh->joined == nranks) shm_unlink(name.c_str());  // every rank has it mapped
        pthread_cond_broadcast(&sh->cv);
        while (sh->joined < nranks) g.wait();
    }
    Comm* c = new Comm();
    c->sh = sh;
    c->name = name;
    c->rank = rank;
    c->device = device;
    *out = c;
    return ncclSuccess;
}

}  // namespace

extern "C" {

Result ncclCommInitRank(Comm** out, int nranks, UniqueId id, int rank) {
    if (out == nullptr || nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks)
        return fail(ncclInvalidArgument, "invalid rank " + std::to_string(rank) + " of " + std::to_string(nranks));
    int device = 0;
    if (cuCtxGetDevice(&device) != 0) return fail(ncclUnhandledCudaError, "no current CUDA context");
    return join_clique(out, clique_name(id.internal), nranks, rank, device);
}

// Blocks until every rank of `comm` has called it (as NCCL's blocking split
// does); the ranks with one color form a new clique, ranked by (key, rank).
// NCCL_SPLIT_NOCOLOR (-1) gets no communicator. The config is ignored.
Result ncclCommSplit(Comm* comm, int color, int key, Comm** out, void* /*config*/) {
    if (comm == nullptr || out == nullptr) return fail(ncclInvalidArgument, "null argument");
    if (comm->aborted) return fail(ncclInvalidUsage, "the communicator was aborted");
    Shared* sh = comm->sh;
    std::vector<int> colors, keys;
    int round = 0;
    {
        Lock g(sh);
        // The previous round is still being read by some rank.
        while (sh->split_arrived == sh->nranks && !sh->aborted) g.wait();
        if (sh->aborted) return fail(ncclRemoteError, "a rank aborted during ncclCommSplit");
        round = sh->split_round;
        sh->split_color[comm->rank] = color;
        sh->split_key[comm->rank] = key;
        if (++sh->split_arrived == sh->nranks) pthread_cond_broadcast(&sh->cv);
        while (sh->split_arrived < sh->nranks && !sh->aborted) g.wait();
        if (sh->aborted) return fail(ncclRemoteError, "a rank aborted during ncclCommSplit");
        colors.assign(sh->split_color, sh->split_color + sh->nranks);
        keys.assign(sh->split_key, sh->split_key + sh->nranks);
        if (++sh->split_departed == sh->nranks) {
            sh->split_arrived = 0;
            sh->split_departed = 0;
            sh->split_round++;
            pthread_cond_broadcast(&sh->cv);
        }
    }
    if (color == -1) {
        *out = nullptr;
        return ncclSuccess;
    }
    if (color < 0) return fail(ncclInvalidArgument, "negative color " + std::to_string(color));
    std::vector<std::pair<int, int>> members;  // (key, rank) of this color
    for (int r = 0; r < static_cast<int>(colors.size()); ++r)
        if (colors[r] == color) members.emplace_back(keys[r], r);
    std::sort(members.begin(), members.end());
    const int new_rank = static_cast<int>(
        std::find(members.begin(), members.end(), std::make_pair(key, comm->rank)) - members.begin());
    const std::string name =
        comm->name + "-split" + std::to_string(round) + "-" + std::to_string(color);
    return join_clique(out, name, static_cast<int>(members.size()), new_rank, comm->device);
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
    Lock g(comm->sh);
    *err = comm->sh->aborted && !comm->aborted ? ncclRemoteError : ncclSuccess;
    return ncclSuccess;
}

// Releases this rank's pending collectives; the peers see ncclRemoteError.
// The communicator and its mapping stay allocated (a late query stays safe).
Result ncclCommAbort(Comm* comm) {
    if (comm == nullptr) return ncclSuccess;
    if (comm->aborted.exchange(true)) return ncclSuccess;
    Lock g(comm->sh);
    __atomic_store_n(&comm->sh->aborted, 1, __ATOMIC_RELEASE);
    // The unfinished collectives' data objects go (their names; mappings stay).
    for (const Slot& s : comm->sh->slots)
        if (s.used && !s.finished) shm_unlink(data_name(*comm, s.seq).c_str());
    pthread_cond_broadcast(&comm->sh->cv);
    return ncclSuccess;
}

Result ncclCommDestroy(Comm* comm) { return ncclCommAbort(comm); }
Result ncclCommFinalize(Comm*) { return ncclSuccess; }

Result ncclCommCount(const Comm* comm, int* count) {
    *count = comm->sh->nranks;
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
    case ncclSystemError: return "system error (emulated NCCL)";
    case ncclRemoteError: return "remote process exited or there was a network error (emulated NCCL)";
    default: return "unhandled error (emulated NCCL)";
    }
}
const char* ncclGetLastError(Comm*) { return last_error.c_str(); }

}  // extern "C"
