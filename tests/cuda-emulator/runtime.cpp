// Scheduler of the CUDA emulator (see cuda_emulator.h): runs a kernel launch
// on the calling OS thread, one block after the other, each CUDA thread of a
// block as a fiber with its own guarded stack. Fibers switch only at barriers
// (`__syncthreads`, warp shuffles), so a run is deterministic.
//
// A fiber starts with makecontext/setcontext; after that, it and the
// scheduler switch with _setjmp/_longjmp, which do not save and restore the
// signal mask. swapcontext does, with a system call per switch: that was a
// fifth of the emulated GPU tests' run time.
//
// Exported (C ABI, called from Rust): syncbn_emu_launch, and for the
// emulator's own tests syncbn_emu_sync_block, syncbn_emu_thread_x and
// syncbn_emu_shuffle_u32.
#include "cuda_emulator.h"  // first: it turns _FORTIFY_SOURCE off, see there

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

namespace cuda_emulator {
namespace {

constexpr int WARP_SIZE = 32;
constexpr std::size_t STACK_BYTES = 256 * 1024;

// A counting barrier: the last of `expected` arrivals starts a new generation.
struct Barrier {
    int expected = 0;
    int arrived = 0;
    std::uint64_t generation = 0;
};

// What a fiber waits for, for the deadlock report.
enum class Waiting { Nothing, Block, Warp };

struct Fiber {
    ucontext_t ctx;  // the start: fiber_main on this fiber's stack
    jmp_buf resume;  // where it waits, once started
    bool started = false;
    void* stack = nullptr;  // mapping: guard page, then STACK_BYTES (see stack())
    uint3 idx{0, 0, 0};
    int lane = 0, warp = 0;
    bool done = false;
    Waiting waiting = Waiting::Nothing;
    unsigned shuffles = 0;  // shuffles completed (selects the exchange buffer)
};

struct Warp {
    Barrier barrier;
    unsigned char slots[2][WARP_SIZE][8];
};

struct Launch {
    uint3 grid{1, 1, 1}, block{1, 1, 1}, block_idx{0, 0, 0};
    void (*body)(void*) = nullptr;
    void* data = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Barrier block_barrier;
    jmp_buf scheduler;  // in resume(), on the launching thread's stack
    int current = -1;
    std::uint64_t progress = 0;  // arrivals and exits; unchanged over a full pass = deadlock
    std::string error;
};

thread_local Launch* active = nullptr;

Fiber& me() { return active->fibers[active->current]; }

void yield_to_scheduler() {
    if (_setjmp(me().resume) == 0) _longjmp(active->scheduler, 1);
}

void wait(Barrier& b, Waiting what) {
    ++active->progress;
    const std::uint64_t gen = b.generation;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    me().waiting = what;
    while (b.generation == gen) yield_to_scheduler();
    me().waiting = Waiting::Nothing;
}

void fiber_main() {
    active->body(active->data);
    me().done = true;
    ++active->progress;
    _longjmp(active->scheduler, 1);  // never returns: its stack is abandoned
}

// Runs fiber t until it waits at a barrier or exits. Not inlined: the frame
// that _setjmp saves must stay put until the fiber jumps back to it.
__attribute__((noinline)) void resume(Launch& l, int t) {
    l.current = t;
    Fiber& f = l.fibers[t];
    if (_setjmp(l.scheduler) != 0) return;
    if (!f.started) {
        f.started = true;
        setcontext(&f.ctx);
    }
    _longjmp(f.resume, 1);
}

std::string describe(const uint3& v) {
    return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

// Runs the threads of the current block to completion or deadlock.
bool run_block(Launch& l) {
    const int n = static_cast<int>(l.fibers.size());
    for (int t = 0; t < n; ++t) {
        Fiber& f = l.fibers[t];
        f.done = false;
        f.waiting = Waiting::Nothing;
        f.shuffles = 0;
        f.started = false;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = static_cast<char*>(f.stack) + getpagesize();
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = nullptr;  // fiber_main jumps back instead of returning
        makecontext(&f.ctx, fiber_main, 0);
    }
    l.block_barrier = Barrier{n, 0, 0};
    for (std::size_t w = 0; w < l.warps.size(); ++w) {
        const int lanes = std::min(WARP_SIZE, n - static_cast<int>(w) * WARP_SIZE);
        l.warps[w].barrier = Barrier{lanes, 0, 0};
    }
    int remaining = n;
    while (remaining > 0) {
        const std::uint64_t before = l.progress;
        for (int t = 0; t < n; ++t) {
            if (l.fibers[t].done) continue;
            resume(l, t);
            if (!l.error.empty()) return false;
            if (l.fibers[t].done) --remaining;
        }
        if (remaining > 0 && l.progress == before) {
            int at_block = 0, at_warp = 0, exited = 0;
            for (const Fiber& f : l.fibers) {
                if (f.done) ++exited;
                else if (f.waiting == Waiting::Block) ++at_block;
                else if (f.waiting == Waiting::Warp) ++at_warp;
            }
            l.error = "deadlock in block " + describe(l.block_idx) + ": " + std::to_string(at_block) +
                      " threads wait at __syncthreads, " + std::to_string(at_warp) +
                      " at a warp shuffle, " + std::to_string(exited) + " have exited";
            return false;
        }
    }
    return true;
}

// Fiber stacks, mapped once per OS thread and reused by its launches (mapping
// 1024 stacks per launch dominated the run time): each is a guard page, so
// that an overflow faults instead of corrupting, then STACK_BYTES.
struct Stacks {
    std::vector<void*> maps;
    ~Stacks() {
        for (void* m : maps) munmap(m, getpagesize() + STACK_BYTES);
    }
};

void* stack(int t) {
    thread_local Stacks stacks;
    while (static_cast<int>(stacks.maps.size()) <= t) {
        const std::size_t page = getpagesize();
        void* m = mmap(nullptr, page + STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return nullptr;
        mprotect(m, page, PROT_NONE);
        stacks.maps.push_back(m);
    }
    return stacks.maps[t];
}

}  // namespace

const uint3& thread_idx() { return me().idx; }
const uint3& block_idx() { return active->block_idx; }
const uint3& block_dim() { return active->block; }
const uint3& grid_dim() { return active->grid; }

void sync_block() { wait(active->block_barrier, Waiting::Block); }

void shuffle(unsigned mask, const void* in, void* out, std::size_t bytes, Shuffle mode, unsigned arg, unsigned width) {
    Fiber& f = me();
    Warp& w = active->warps[f.warp];
    if (mask != 0xffffffffu || w.barrier.expected != WARP_SIZE) {
        active->error = "warp shuffle with a partial mask or a partial warp";
        yield_to_scheduler();  // never resumed: the launch is abandoned
    }
    if (width == 0 || width > static_cast<unsigned>(WARP_SIZE) || (width & (width - 1)) != 0) {
        active->error = "warp shuffle with a width that is not a power of two up to 32";
        yield_to_scheduler();
    }
    // Two buffers alternate: a lane can only write buffer b again after the
    // next shuffle's barrier, which every lane passes after reading buffer b.
    unsigned char(&slots)[WARP_SIZE][8] = w.slots[f.shuffles & 1];
    std::memcpy(slots[f.lane], in, bytes);
    wait(w.barrier, Waiting::Warp);
    // PTX's shfl.sync: the caller's group spans [first, last]; down and xor
    // may read up to `last` (xor also earlier groups), up down to `first`;
    // any other source leaves the caller with its own value.
    const unsigned lane = static_cast<unsigned>(f.lane);
    const unsigned first = lane & ~(width - 1);
    const unsigned last = first + width - 1;
    const unsigned b = arg & 31u;
    unsigned src = lane;
    switch (mode) {
    case Shuffle::Down: src = lane + b <= last ? lane + b : lane; break;
    case Shuffle::Up: src = lane >= first + b ? lane - b : lane; break;
    case Shuffle::Xor: src = (lane ^ b) <= last ? lane ^ b : lane; break;
    case Shuffle::Index: src = first | (b & (width - 1)); break;
    }
    std::memcpy(out, slots[src], bytes);
    ++f.shuffles;
}

}  // namespace cuda_emulator

using namespace cuda_emulator;

// Runs `body(data)` as every thread of a grid of `grid[0..3]` blocks of
// `block[0..3]` threads. Returns 0, or 1 with a message in `err` (at most
// `err_len` bytes, NUL-terminated) after a deadlock or a misuse.
extern "C" int syncbn_emu_launch(const unsigned* grid, const unsigned* block, void (*body)(void*), void* data,
                                 char* err, std::size_t err_len) {
    Launch l;
    l.grid = uint3{grid[0], grid[1], grid[2]};
    l.block = uint3{block[0], block[1], block[2]};
    l.body = body;
    l.data = data;
    const long long threads = static_cast<long long>(block[0]) * block[1] * block[2];
    auto fail = [&](const std::string& msg) {
        if (err_len > 0) std::snprintf(err, err_len, "%s", msg.c_str());
        return 1;
    };
    if (threads <= 0 || threads > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0)
        return fail("invalid launch: grid " + describe(l.grid) + ", block " + describe(l.block));
    l.fibers.resize(threads);
    l.warps.resize((threads + WARP_SIZE - 1) / WARP_SIZE);
    int t = 0;
    for (unsigned z = 0; z < block[2]; ++z)
        for (unsigned y = 0; y < block[1]; ++y)
            for (unsigned x = 0; x < block[0]; ++x, ++t) {
                Fiber& f = l.fibers[t];
                f.idx = uint3{x, y, z};
                f.lane = t % WARP_SIZE;
                f.warp = t / WARP_SIZE;
                f.stack = stack(t);
                if (f.stack == nullptr) return fail("cannot map a fiber stack");
            }
    Launch* outer = active;
    active = &l;
    bool ok = true;
    for (unsigned bz = 0; ok && bz < grid[2]; ++bz)
        for (unsigned by = 0; ok && by < grid[1]; ++by)
            for (unsigned bx = 0; ok && bx < grid[0]; ++bx) {
                l.block_idx = uint3{bx, by, bz};
                ok = run_block(l);
                if (!ok) break;
            }
    active = outer;
    return ok ? 0 : fail(l.error);
}

// `__syncthreads()`, `threadIdx.x` and the warp shuffles (`mode` 0 to 3:
// down, up, xor, index), for tests of the emulator itself.
extern "C" void syncbn_emu_sync_block() { sync_block(); }
extern "C" unsigned syncbn_emu_thread_x() { return thread_idx().x; }
extern "C" unsigned syncbn_emu_shuffle_u32(unsigned mode, unsigned value, unsigned arg, unsigned width) {
    unsigned out = 0;
    shuffle(0xffffffffu, &value, &out, sizeof value, static_cast<Shuffle>(mode), arg, width);
    return out;
}
