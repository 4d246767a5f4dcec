// An emulated NCCL (libnccl.so.2) for the emulated GPU (fake_driver.cpp):
// communicators of ranks on one machine, threads of one process or separate
// processes (one per emulated GPU, as the launcher starts them). Built by
// scripts/emulated-gpu.sh.
//
// It is the only multi-rank NCCL the project's CI runs, so it is at least as
// strict as the real one: what real NCCL leaves undefined, hanging or
// crashing, it makes hang or crash too (loudly where it can), so that code
// which only works on a friendly NCCL fails here first.
//
// The ranks meet in POSIX shared memory (/dev/shm): a clique's header (a
// process-shared mutex and condition variable, who joined, and a ring of
// RING collective slots), and one object per collective that holds every
// rank's contribution and the result. Names are unlinked as soon as every
// rank has opened them.
//
// What it models, as NCCL does it:
// - Blocking and non-blocking communicators (ncclConfig_t.blocking, as
//   ncclCommInitRankConfig and ncclCommSplit take it). A blocking call waits
//   on the caller's thread, without a deadline; a non-blocking one returns
//   ncclInProgress and progresses while ncclCommGetAsyncError is polled.
// - ncclCommInitRank(Config) completes when every rank of the clique has
//   joined. Two ranks on one device are ncclInvalidUsage on every rank.
// - ncclCommSplit completes when every rank of the communicator has called it
//   and each color's ranks (ranked by key) have joined a clique of their own.
// - Lazy connection: the first collective of each size class (under 64 KiB,
//   as small collectives take other algorithms than large ones) waits on the
//   host until every rank has issued its first collective of that class
//   (NCCL_RUNTIME_CONNECT=0 connects both classes at init instead).
// - A collective is enqueued, not run: it returns and is pending on the
//   caller's stream (see emu_streams.h); later work on that stream, its events
//   and cuMemFree wait for it. It runs ("the device executes it") when every
//   rank has enqueued a matching part and some rank's stream or event is
//   waited for or queried; ranks that make different calls (count, type,
//   operation, root) or a rank that never calls leave it pending forever: a
//   hang, as on a GPU.
// - ncclCommAbort kills the rank's kernels: every collective of the clique
//   that has not run yet never runs, on any rank; the caller's own pending
//   parts are released (their results are undefined). The peers are not told:
//   their collectives stay pending until they give up themselves (their own
//   timeout and abort), as on a real network where a dead peer is silence.
// - ncclCommAbort and ncclCommDestroy free the communicator: any later call
//   with it is a use after free, and so is freeing it while another thread is
//   inside a call on it. Both print what happened and abort the process (real
//   NCCL would read freed memory).
// - ncclCommFinalize completes when this rank's collectives have run;
//   ncclCommDestroy without it finalizes first (blocking).
// Sums are computed in f64 (f32 would do for the small counts of tests) and
// rounded once; NCCL's ring sums in the element type, so half-precision sums
// may differ in the last bits.
//
// For tests, syncbn_emu_nccl_delay_next_init(ms) makes the calling thread's
// next ncclCommInitRank(Config) join its clique only after `ms` milliseconds
// (a peer late for init; ULLONG_MAX: never, a dead one);
// syncbn_emu_nccl_delay_next_split(ms) does the same to its next
// ncclCommSplit (a peer that never joins a split), and
// syncbn_emu_nccl_fail_parent_of_next_split(ms) makes the communicator that
// its next ncclCommSplit splits report ncclRemoteError (as NCCL does when a
// peer's connection breaks) `ms` milliseconds into the split.
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
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_streams.h"

extern "C" int cuCtxGetDevice(int* device);  // the emulated driver's
extern "C" int cuCtxGetCurrent(void** ctx);
extern "C" int cuCtxSetCurrent(void* ctx);

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
    ncclInProgress = 7,
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
// Collectives of at least this many bytes are "large": another algorithm,
// connected separately (lazily, by the first large collective).
constexpr std::size_t LARGE_BYTES = 64 * 1024;
constexpr unsigned CONFIG_MAGIC = 0xcafebeef;

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
    int device_of[MAX_RANKS];
    int aborted;             // some rank aborted: what has not run never will
    int connect_arrived[2];  // ranks that connected each size class
    Slot slots[RING];
    // ncclCommSplit: every rank posts its color and key, then reads all.
    int split_round;     // splits completed on this clique
    int split_arrived;   // ranks that posted in the current round
    int split_departed;  // ranks that read the current round
    int split_color[MAX_RANKS];
    int split_key[MAX_RANKS];
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

std::string data_name(const std::string& clique, std::uint64_t seq) { return clique + "-" + std::to_string(seq); }

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

bool is_float(int t) { return t == Float16 || t == Float32 || t == Float64 || t == Bfloat16; }

// `v` rounded to the data type `t` (as a value of that type, read back).
double round_to(int t, double v) {
    unsigned char cell[8];
    store(cell, 0, t, v);
    return load(cell, 0, t);
}

// Computes a collective whose contributions are all in `data`. ncclAvg is
// NCCL's: on floating-point types each contribution is first multiplied by
// 1/nranks rounded to the type (ncclDevPreMulSum), then summed; on integers
// the sum is divided (truncating) at the end.
void compute(const Slot& s, unsigned char* data, std::size_t bytes, int nranks) {
    const std::size_t n = s.count;
    unsigned char* out = data + bytes * nranks;
    const bool premul = s.op == Avg && is_float(s.type);
    const double scale = round_to(s.type, 1.0 / nranks);
    auto contribution = [&](int r, std::size_t i) {
        const double v = load(data + bytes * r, i, s.type);
        return premul ? round_to(s.type, v * scale) : v;
    };
    for (std::size_t i = 0; i < n; ++i) {
        double acc;
        if (s.broadcast) {
            acc = load(data + bytes * s.root, i, s.type);
        } else {
            acc = contribution(0, i);
            for (int r = 1; r < nranks; ++r) {
                const double v = contribution(r, i);
                switch (s.op) {
                case Sum: case Avg: acc += v; break;
                case Prod: acc *= v; break;
                case Max: acc = std::isnan(acc) ? acc : (std::isnan(v) ? v : std::max(acc, v)); break;
                case Min: acc = std::isnan(acc) ? acc : (std::isnan(v) ? v : std::min(acc, v)); break;
                default: break;
                }
            }
            if (s.op == Avg && !premul) acc = std::trunc(acc / nranks);
        }
        store(out, i, s.type, acc);
    }
}

struct Part;

// A rank's side of a communicator. It outlives the handle (ncclComm_t) that
// ncclCommAbort/ncclCommDestroy free: the rank's pending parts still hold it.
struct State {
    Shared* sh = nullptr;  // the clique, once joined
    std::string name;      // the clique header's shared-memory name
    int rank = 0, nranks = 0, device = 0;
    bool blocking = true;
    std::uint64_t seq = 0;
    std::atomic<bool> aborted{false};
    std::atomic<bool> connected[2] = {false, false};
    std::atomic<bool> finalized{false};
    std::atomic<int> splits_in_flight{0};  // non-blocking splits still reading this clique
    std::shared_ptr<State> split_parent;    // of a split's communicator
    std::atomic<bool> split_counted{false};  // counted in split_parent's splits_in_flight
    std::mutex m;                       // op and async
    std::function<Result()> op;         // the non-blocking call in progress
    Result async = ncclSuccess;         // its error, once failed (sticky)
    std::atomic<long long> fail_at_ns{-1};  // test hook: ncclRemoteError from then on (steady clock)
    std::mutex issued_m;
    std::vector<std::weak_ptr<Part>> issued;  // for ncclCommFinalize
};

// One rank's part of a collective: the work pending on that rank's stream.
// The collective runs when every rank has enqueued it and some rank's
// stream or event is waited for or queried (the device got to it); the
// result is then copied into this rank's receive buffer. A part with slot -1
// never finishes (enqueued after a rank aborted: the clique is dead).
struct Part : cuda_emulator::PendingWork {
    std::shared_ptr<State> st;
    int slot;
    std::uint64_t seq;
    unsigned char* data;  // the collective's data object: nranks contributions, then the result
    std::size_t bytes;    // of one contribution
    void* recv;
    bool copied = false;

    Part(std::shared_ptr<State> s, int slot, std::uint64_t seq, unsigned char* data, std::size_t bytes, void* recv)
        : st(std::move(s)), slot(slot), seq(seq), data(data), bytes(bytes), recv(recv) {}
    ~Part() override {
        if (data != nullptr) munmap(data, bytes * (st->nranks + 1));
    }
    // Under the clique's lock: runs the collective if it can; whether this
    // part is over (its result copied, or released by this rank's abort).
    bool progress() {
        if (copied) return true;
        Shared* sh = st->sh;
        if (slot >= 0) {
            Slot& s = sh->slots[slot];
            if (s.used && s.seq == seq) {
                if (!s.finished && s.arrived == sh->nranks && !s.mismatch && !sh->aborted) {
                    if (data != nullptr) compute(s, data, bytes, sh->nranks);
                    s.finished = 1;
                    pthread_cond_broadcast(&sh->cv);
                }
                if (s.finished) {
                    if (bytes > 0) std::memcpy(recv, data + bytes * sh->nranks, bytes);
                    copied = true;
                    if (++s.consumed == sh->nranks) s.used = 0;
                    pthread_cond_broadcast(&sh->cv);
                    return true;
                }
            }
        }
        return st->aborted.load();  // released by an abort: the result is undefined
    }
    bool done() override {
        Lock g(st->sh);
        return progress();
    }
    void wait() override {
        Lock g(st->sh);
        while (!progress()) g.wait();
    }
};

// Enqueues a (connected) collective on `stream` of the current context.
Result enqueue(const std::shared_ptr<State>& st, bool broadcast, const void* send, void* recv, std::size_t count,
               int type, int op, int root, void* stream) {
    Shared* sh = st->sh;
    const std::uint64_t seq = st->seq++;
    const int k = static_cast<int>(seq % RING);
    const std::size_t bytes = count * type_size(type);
    const std::size_t total = bytes * (sh->nranks + 1);
    bool first = false, matches = true;
    const auto defer = [&](std::shared_ptr<Part> part) {
        {
            std::lock_guard<std::mutex> g(st->issued_m);
            st->issued.push_back(part);
        }
        const std::shared_ptr<cuda_emulator::PendingWork> work = std::move(part);
        syncbn_emu_defer(stream, &work);
        return ncclSuccess;
    };
    const auto dead = [&] { return defer(std::make_shared<Part>(st, -1, seq, nullptr, bytes, recv)); };
    {
        Lock g(sh);
        if (sh->aborted) return dead();
        // Wait while an older collective still holds the slot (this rank is
        // RING collectives ahead of another).
        while (sh->slots[k].used && sh->slots[k].seq != seq && !sh->aborted) g.wait();
        if (sh->aborted) return dead();
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
        data = static_cast<unsigned char*>(map_shared(data_name(st->name, seq), total, first, &sh->aborted));
        if (data == nullptr) {
            if (__atomic_load_n(&sh->aborted, __ATOMIC_ACQUIRE) != 0) return dead();
            return fail(ncclSystemError, "cannot map the shared memory of a collective");
        }
        if (bytes > 0) std::memcpy(data + bytes * st->rank, send, bytes);
    }
    {
        Lock g(sh);
        Slot& s = sh->slots[k];
        if (matches && ++s.arrived == sh->nranks) {
            shm_unlink(data_name(st->name, seq).c_str());  // every rank has it mapped
            pthread_cond_broadcast(&sh->cv);
        }
    }
    return defer(std::make_shared<Part>(st, matches ? k : -1, seq, data, bytes, recv));
}

// --- communicator handles ------------------------------------------------

// The handle a ncclComm_t points to. Freed handles stay allocated (and
// listed) so that a later use is detected, not a read of reused memory.
struct Comm {
    std::shared_ptr<State> st;
    std::vector<const char*> inside;  // the calls of threads inside a call with it
};

std::mutex registry_m;
std::set<const Comm*> live_comms, freed_comms;

[[noreturn]] void use_after_free(const char* what, const Comm* comm) {
    std::fprintf(stderr,
                 "emulated NCCL: FATAL: %s on communicator %p, which ncclCommAbort or ncclCommDestroy freed: a use "
                 "after free (real NCCL reads freed memory here)\n",
                 what, static_cast<const void*>(comm));
    std::fflush(stderr);
    std::abort();
}

// A call's hold on a communicator handle, for as long as the call runs.
class Entry {
  public:
    Entry(const Comm* comm, const char* fn) : c_(const_cast<Comm*>(comm)) {
        std::lock_guard<std::mutex> g(registry_m);
        if (c_ == nullptr) return;
        if (freed_comms.count(c_) != 0) use_after_free(fn, c_);
        if (live_comms.count(c_) == 0) return;
        c_->inside.push_back(fn);
        fn_ = fn;
        ok_ = true;
    }
    ~Entry() {
        if (!ok_) return;
        std::lock_guard<std::mutex> g(registry_m);
        c_->inside.erase(std::find(c_->inside.begin(), c_->inside.end(), fn_));
    }
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;
    bool ok() const { return ok_; }
    const std::shared_ptr<State>& st() const { return c_->st; }

  private:
    Comm* c_;
    const char* fn_ = "";
    bool ok_ = false;
};

Comm* new_handle(std::shared_ptr<State> st) {
    Comm* c = new Comm();
    c->st = std::move(st);
    std::lock_guard<std::mutex> g(registry_m);
    live_comms.insert(c);
    return c;
}

// Frees `comm` (ncclCommAbort, ncclCommDestroy): its state, or null if it
// is not a communicator. Freeing it while another thread is inside a call
// with it, or while a split from it still reads it, is a use after free.
std::shared_ptr<State> release(Comm* comm, const char* fn) {
    std::lock_guard<std::mutex> g(registry_m);
    if (freed_comms.count(comm) != 0) use_after_free(fn, comm);
    if (live_comms.count(comm) == 0) return nullptr;
    if (!comm->inside.empty()) {
        std::string calls;
        for (const char* c : comm->inside) calls += (calls.empty() ? "" : ", ") + std::string(c);
        std::fprintf(stderr,
                     "emulated NCCL: FATAL: %s frees communicator %p while another thread is inside %s with it: "
                     "that thread would use freed memory (serialize calls on a communicator with its "
                     "abort)\n",
                     fn, static_cast<void*>(comm), calls.c_str());
        std::fflush(stderr);
        std::abort();
    }
    if (comm->st->splits_in_flight.load() > 0) {
        std::fprintf(stderr,
                     "emulated NCCL: FATAL: %s frees communicator %p while a non-blocking ncclCommSplit from it "
                     "is still in progress: the split would use freed memory\n",
                     fn, static_cast<void*>(comm));
        std::fflush(stderr);
        std::abort();
    }
    live_comms.erase(comm);
    freed_comms.insert(comm);
    return std::move(comm->st);
}

// --- blocking and non-blocking calls -----------------------------------

using Clock = std::chrono::steady_clock;

// Runs a call's progress function to completion on the caller's thread.
Result run_blocking(const std::function<Result()>& op) {
    for (;;) {
        const Result r = op();
        if (r != ncclInProgress) return r;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
}

// Starts a call: to completion on a blocking communicator; else one step,
// and, unfinished, ncclInProgress (ncclCommGetAsyncError progresses it).
Result start(State& st, std::function<Result()> op) {
    if (st.blocking) return run_blocking(op);
    std::lock_guard<std::mutex> g(st.m);
    const Result r = op();
    if (r == ncclInProgress) {
        st.op = std::move(op);
    } else if (r != ncclSuccess) {
        st.async = r;
    }
    return r;
}

// Whether a new call may start: none is in progress and none failed.
Result ready_for_call(State& st, const char* fn) {
    std::lock_guard<std::mutex> g(st.m);
    if (st.op)
        return fail(ncclInvalidUsage, std::string(fn) +
                                          ": the previous non-blocking call on this communicator is still in "
                                          "progress (poll ncclCommGetAsyncError until it is done)");
    if (st.async != ncclSuccess)
        return fail(st.async, std::string(fn) + ": the communicator failed earlier (error " +
                                  std::to_string(st.async) + ")");
    return ncclSuccess;
}

// Opens (creating it if first) the header of clique `name` and joins it.
Result attach(State& st, const std::string& name, int nranks, int rank) {
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
    const char* rc = std::getenv("NCCL_RUNTIME_CONNECT");
    const bool eager = rc != nullptr && std::string(rc) == "0";
    Lock g(sh);
    if (sh->nranks != nranks) return fail(ncclInvalidUsage, "ranks disagree on the number of ranks");
    if (sh->taken[rank]) return fail(ncclInvalidUsage, "rank " + std::to_string(rank) + " joined twice");
    sh->taken[rank] = 1;
    sh->device_of[rank] = st.device;
    if (eager) {
        // Both size classes connect at init, with the join.
        sh->connect_arrived[0]++;
        sh->connect_arrived[1]++;
        st.connected[0] = true;
        st.connected[1] = true;
    }
    if (++sh->joined == nranks) shm_unlink(name.c_str());  // every rank has it mapped
    pthread_cond_broadcast(&sh->cv);
    st.sh = sh;
    st.name = name;
    st.rank = rank;
    st.nranks = nranks;
    return ncclSuccess;
}

// Whether every rank has joined `st`'s clique; two on one device are an error.
Result joined(State& st) {
    Lock g(st.sh);
    if (st.sh->joined < st.nranks) return ncclInProgress;
    for (int a = 0; a < st.nranks; ++a)
        for (int b = a + 1; b < st.nranks; ++b)
            if (st.sh->device_of[a] == st.sh->device_of[b])
                return fail(ncclInvalidUsage, "Duplicate GPU detected: rank " + std::to_string(a) + " and rank " +
                                                  std::to_string(b) + " both on CUDA device " +
                                                  std::to_string(st.sh->device_of[a]));
    return ncclSuccess;
}

// The progress of joining clique `name` as `rank` (not before `not_before`).
std::function<Result()> join_op(std::shared_ptr<State> st, std::string name, int nranks, int rank,
                                Clock::time_point not_before) {
    auto attached = std::make_shared<bool>(false);
    return [=]() -> Result {
        if (!*attached) {
            if (Clock::now() < not_before) return ncclInProgress;
            const Result r = attach(*st, name, nranks, rank);
            if (r != ncclSuccess) return r;
            *attached = true;
        }
        return joined(*st);
    };
}

// The progress of ncclCommFinalize: every collective of this rank has run.
std::function<Result()> finalize_op(std::shared_ptr<State> st) {
    return [st]() -> Result {
        std::lock_guard<std::mutex> g(st->issued_m);
        for (auto it = st->issued.begin(); it != st->issued.end();) {
            const std::shared_ptr<Part> p = it->lock();
            if (p && !p->done()) return ncclInProgress;
            it = st->issued.erase(it);
        }
        st->finalized = true;
        return ncclSuccess;
    };
}

// A collective: connects its size class first (lazily, waiting for every
// rank's first collective of that class), then enqueues it.
Result collective(const Comm* comm, const char* fn, bool broadcast, const void* send, void* recv, std::size_t count,
                  int type, int op, int root, void* stream) {
    Entry e(comm, fn);
    if (!e.ok()) return fail(ncclInvalidArgument, std::string(fn) + ": not a communicator");
    const std::shared_ptr<State>& st = e.st();
    if (type_size(type) == 0) return fail(ncclInvalidArgument, "unsupported data type " + std::to_string(type));
    if (!broadcast && (op < Sum || op > Avg)) return fail(ncclInvalidArgument, "unsupported reduction");
    if (broadcast && (root < 0 || root >= st->nranks)) return fail(ncclInvalidArgument, "root out of range");
    if (count > 0 && (send == nullptr || recv == nullptr)) return fail(ncclInvalidArgument, "null buffer");
    const Result r = ready_for_call(*st, fn);
    if (r != ncclSuccess) return r;
    const int cls = count * type_size(type) >= LARGE_BYTES ? 1 : 0;
    if (st->connected[cls]) return enqueue(st, broadcast, send, recv, count, type, op, root, stream);
    void* ctx = nullptr;
    cuCtxGetCurrent(&ctx);
    auto arrived = std::make_shared<bool>(false);
    return start(*st, [=]() -> Result {
        {
            Lock g(st->sh);
            if (!*arrived) {
                st->sh->connect_arrived[cls]++;
                *arrived = true;
                pthread_cond_broadcast(&st->sh->cv);
            }
            if (st->sh->connect_arrived[cls] < st->nranks) return ncclInProgress;
        }
        st->connected[cls] = true;
        // Progress may come from another thread's ncclCommGetAsyncError: the
        // work goes on the caller's stream of the caller's context.
        void* current = nullptr;
        cuCtxGetCurrent(&current);
        cuCtxSetCurrent(ctx);
        const Result res = enqueue(st, broadcast, send, recv, count, type, op, root, stream);
        cuCtxSetCurrent(current);
        return res;
    });
}

thread_local unsigned long long next_init_delay_ms = 0;
thread_local unsigned long long next_split_delay_ms = 0;
thread_local unsigned long long next_split_parent_failure_ms = ULLONG_MAX;

long long steady_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// `ms` milliseconds from now on the steady clock, in ns (LLONG_MAX: never).
long long steady_ns_after(unsigned long long ms) {
    if (ms >= static_cast<unsigned long long>(LLONG_MAX / 1000000 / 2)) return LLONG_MAX;
    return steady_ns() + static_cast<long long>(ms) * 1000000;
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

// The head of ncclConfig_t, as every version since 2.14 lays it out.
struct ConfigHead {
    std::size_t size;
    unsigned magic;
    unsigned version;
    int blocking;
};

// Test hook: the calling thread's next ncclCommInitRank(Config) joins its
// clique only `ms` milliseconds later (ULLONG_MAX: never).
void syncbn_emu_nccl_delay_next_init(unsigned long long ms) { next_init_delay_ms = ms; }

// Test hooks: the calling thread's next ncclCommSplit posts its color only
// `ms` milliseconds later (ULLONG_MAX: never); makes its parent report
// ncclRemoteError from `ms` milliseconds after the call on.
void syncbn_emu_nccl_delay_next_split(unsigned long long ms) { next_split_delay_ms = ms; }
void syncbn_emu_nccl_fail_parent_of_next_split(unsigned long long ms) { next_split_parent_failure_ms = ms; }

Result ncclCommInitRankConfig(Comm** out, int nranks, UniqueId id, int rank, const ConfigHead* config) {
    if (out == nullptr || nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks)
        return fail(ncclInvalidArgument, "invalid rank " + std::to_string(rank) + " of " + std::to_string(nranks));
    bool blocking = true;
    if (config != nullptr) {
        if (config->magic != CONFIG_MAGIC || config->size < sizeof(ConfigHead))
            return fail(ncclInvalidArgument, "ncclConfig_t not initialized as NCCL_CONFIG_INITIALIZER does");
        if (config->blocking != INT_MIN) blocking = config->blocking != 0;
    }
    auto st = std::make_shared<State>();
    st->blocking = blocking;
    if (cuCtxGetDevice(&st->device) != 0) return fail(ncclUnhandledCudaError, "no current CUDA context");
    const unsigned long long delay = next_init_delay_ms;
    next_init_delay_ms = 0;
    const Clock::time_point not_before =
        delay == ULLONG_MAX ? Clock::time_point::max() : Clock::now() + std::chrono::milliseconds(delay);
    const Result r = start(*st, join_op(st, clique_name(id.internal), nranks, rank, not_before));
    if (r != ncclSuccess && r != ncclInProgress) return r;
    *out = new_handle(st);
    return r;
}

Result ncclCommInitRank(Comm** out, int nranks, UniqueId id, int rank) {
    return ncclCommInitRankConfig(out, nranks, id, rank, nullptr);
}

// Completes when every rank of `comm` has called it and this color's ranks
// (ranked by (key, rank)) have joined their clique. NCCL_SPLIT_NOCOLOR (-1)
// gets no communicator. A null config keeps the parent's blocking mode.
Result ncclCommSplit(Comm* comm, int color, int key, Comm** out, const ConfigHead* config) {
    Entry e(comm, "ncclCommSplit");
    if (!e.ok() || out == nullptr) return fail(ncclInvalidArgument, "ncclCommSplit: null or invalid argument");
    const std::shared_ptr<State> parent = e.st();
    Result r = ready_for_call(*parent, "ncclCommSplit");
    if (r != ncclSuccess) return r;
    if (color < -1) return fail(ncclInvalidArgument, "negative color " + std::to_string(color));
    bool blocking = parent->blocking;
    if (config != nullptr) {
        if (config->magic != CONFIG_MAGIC || config->size < sizeof(ConfigHead))
            return fail(ncclInvalidArgument, "ncclConfig_t not initialized as NCCL_CONFIG_INITIALIZER does");
        if (config->blocking != INT_MIN) blocking = config->blocking != 0;
    }
    auto st = std::make_shared<State>();
    st->blocking = blocking && color != -1;
    st->device = parent->device;
    struct Progress {
        int phase = 0, round = 0;
        std::function<Result()> join;
    };
    auto p = std::make_shared<Progress>();
    const long long post_at = next_split_delay_ms == 0 ? 0 : steady_ns_after(next_split_delay_ms);
    next_split_delay_ms = 0;
    if (next_split_parent_failure_ms != ULLONG_MAX) {
        parent->fail_at_ns = steady_ns_after(next_split_parent_failure_ms);
        next_split_parent_failure_ms = ULLONG_MAX;
    }
    st->split_parent = parent;
    st->split_counted = true;
    parent->splits_in_flight++;
    std::function<Result()> op = [=]() -> Result {
        Shared* sh = parent->sh;
        if (p->phase == 0) {
            if (post_at != 0 && steady_ns() < post_at) return ncclInProgress;
            Lock g(sh);
            if (sh->split_arrived == sh->nranks) return ncclInProgress;  // the previous round is being read
            p->round = sh->split_round;
            sh->split_color[parent->rank] = color;
            sh->split_key[parent->rank] = key;
            if (++sh->split_arrived == sh->nranks) pthread_cond_broadcast(&sh->cv);
            p->phase = 1;
        }
        if (p->phase == 1) {
            std::vector<int> colors, keys;
            {
                Lock g(sh);
                if (sh->split_arrived < sh->nranks) return ncclInProgress;
                colors.assign(sh->split_color, sh->split_color + sh->nranks);
                keys.assign(sh->split_key, sh->split_key + sh->nranks);
                if (++sh->split_departed == sh->nranks) {
                    sh->split_arrived = 0;
                    sh->split_departed = 0;
                    sh->split_round++;
                    pthread_cond_broadcast(&sh->cv);
                }
            }
            if (st->split_counted.exchange(false)) parent->splits_in_flight--;
            p->phase = 2;
            if (color == -1) return ncclSuccess;
            std::vector<std::pair<int, int>> members;  // (key, rank) of this color
            for (int q = 0; q < static_cast<int>(colors.size()); ++q)
                if (colors[q] == color) members.emplace_back(keys[q], q);
            std::sort(members.begin(), members.end());
            const int new_rank = static_cast<int>(
                std::find(members.begin(), members.end(), std::make_pair(key, parent->rank)) - members.begin());
            const std::string name = parent->name + "-split" + std::to_string(p->round) + "-" + std::to_string(color);
            p->join = join_op(st, name, static_cast<int>(members.size()), new_rank, Clock::time_point::min());
        }
        return p->join();
    };
    if (color == -1) {
        *out = nullptr;
        return run_blocking(op);
    }
    r = start(*st, std::move(op));
    if (r != ncclSuccess && r != ncclInProgress) return r;
    *out = new_handle(st);
    return r;
}

Result ncclAllReduce(const void* send, void* recv, std::size_t count, int type, int op, Comm* comm,
                     void* stream) {
    return collective(comm, "ncclAllReduce", false, send, recv, count, type, op, 0, stream);
}

Result ncclBroadcast(const void* send, void* recv, std::size_t count, int type, int root, Comm* comm,
                     void* stream) {
    return collective(comm, "ncclBroadcast", true, send, recv, count, type, Sum, root, stream);
}

// The state of `comm`: ncclInProgress while a non-blocking call is (and
// this progresses it), its error once it failed, else ncclSuccess. A peer's
// failure is never reported: peers of a dead rank see only silence.
Result ncclCommGetAsyncError(Comm* comm, Result* err) {
    Entry e(comm, "ncclCommGetAsyncError");
    if (!e.ok() || err == nullptr) return fail(ncclInvalidArgument, "ncclCommGetAsyncError: invalid argument");
    State& st = *e.st();
    std::lock_guard<std::mutex> g(st.m);
    if (st.op) {
        const Result r = st.op();
        if (r == ncclInProgress) {
            *err = ncclInProgress;
            return ncclSuccess;
        }
        st.op = nullptr;
        if (r != ncclSuccess) st.async = r;
    }
    const long long fail_at = st.fail_at_ns.load();
    if (st.async == ncclSuccess && fail_at >= 0 && steady_ns() >= fail_at) st.async = ncclRemoteError;
    *err = st.async;
    return ncclSuccess;
}

// Kills this rank's kernels (what has not run yet, on any rank, never runs),
// releases its pending parts, and frees the communicator. Peers are not told.
Result ncclCommAbort(Comm* comm) {
    if (comm == nullptr) return ncclSuccess;
    const std::shared_ptr<State> st = release(comm, "ncclCommAbort");
    if (!st) return fail(ncclInvalidArgument, "ncclCommAbort: not a communicator");
    st->aborted = true;
    if (st->split_counted.exchange(false)) st->split_parent->splits_in_flight--;  // the split is abandoned
    if (st->sh != nullptr) {
        Lock g(st->sh);
        __atomic_store_n(&st->sh->aborted, 1, __ATOMIC_RELEASE);
        // The unfinished collectives' data objects go (their names; mappings stay).
        for (const Slot& s : st->sh->slots)
            if (s.used && !s.finished) shm_unlink(data_name(st->name, s.seq).c_str());
        // A clique some rank never joined: its header's name goes too.
        if (st->sh->joined < st->sh->nranks) shm_unlink(st->name.c_str());
        pthread_cond_broadcast(&st->sh->cv);
    }
    return ncclSuccess;
}

// Completes when every collective of this rank has run (non-blocking:
// ncclInProgress until then).
Result ncclCommFinalize(Comm* comm) {
    Entry e(comm, "ncclCommFinalize");
    if (!e.ok()) return fail(ncclInvalidArgument, "ncclCommFinalize: not a communicator");
    const Result r = ready_for_call(*e.st(), "ncclCommFinalize");
    if (r != ncclSuccess) return r;
    return start(*e.st(), finalize_op(e.st()));
}

// Frees the communicator, after finalizing it (blocking) if that was not done.
Result ncclCommDestroy(Comm* comm) {
    {
        Entry e(comm, "ncclCommDestroy");
        if (!e.ok()) return fail(ncclInvalidArgument, "ncclCommDestroy: not a communicator");
        if (!e.st()->finalized) {
            const Result r = run_blocking(finalize_op(e.st()));
            if (r != ncclSuccess) return r;
        }
    }
    if (!release(comm, "ncclCommDestroy")) return fail(ncclInvalidArgument, "ncclCommDestroy: not a communicator");
    return ncclSuccess;
}

Result ncclCommCount(const Comm* comm, int* count) {
    Entry e(comm, "ncclCommCount");
    if (!e.ok() || count == nullptr) return fail(ncclInvalidArgument, "ncclCommCount: invalid argument");
    *count = e.st()->nranks;
    return ncclSuccess;
}
Result ncclCommUserRank(const Comm* comm, int* rank) {
    Entry e(comm, "ncclCommUserRank");
    if (!e.ok() || rank == nullptr) return fail(ncclInvalidArgument, "ncclCommUserRank: invalid argument");
    *rank = e.st()->rank;
    return ncclSuccess;
}
Result ncclCommCuDevice(const Comm* comm, int* device) {
    Entry e(comm, "ncclCommCuDevice");
    if (!e.ok() || device == nullptr) return fail(ncclInvalidArgument, "ncclCommCuDevice: invalid argument");
    *device = e.st()->device;
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
    case ncclInProgress: return "operation in progress (emulated NCCL)";
    default: return "unhandled error (emulated NCCL)";
    }
}
const char* ncclGetLastError(Comm*) { return last_error.c_str(); }

}  // extern "C"
