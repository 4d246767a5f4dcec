// Deferred stream work of the emulated driver (fake_driver.cpp), for the
// emulated NCCL (fake_nccl.cpp). Kernels and copies run when they are
// enqueued, but a collective can only finish when every rank has enqueued
// its part: until then it is pending on its stream. Like the device, the
// driver makes later work on that stream (launches, copies, frees, stream
// and event synchronization) wait for it, and events recorded after it are
// not complete until it is.
#pragma once

#include <memory>

namespace cuda_emulator {

// Work that finishes later (a collective waiting for its peers).
struct PendingWork {
    virtual ~PendingWork() = default;
    // Whether it has finished (completed or aborted); never blocks.
    virtual bool done() = 0;
    // Blocks until it has finished.
    virtual void wait() = 0;
};

}  // namespace cuda_emulator

// Waits for the pending work of `stream` of the calling thread's current
// context (for the emulated libraries that run work on a stream).
extern "C" void syncbn_emu_drain(void* stream);

// How many calls of the calling OS thread made the host wait for the device
// (synchronizations, device-to-host copies, synchronous frees).
extern "C" unsigned long long syncbn_emu_host_syncs();

// How many device-to-host copies the calling OS thread made (each is also
// counted by syncbn_emu_host_syncs).
extern "C" unsigned long long syncbn_emu_dtoh_copies();

// How many launches of this crate's kernels (bn_*) the calling OS thread made.
extern "C" unsigned long long syncbn_emu_crate_launches();

// How many launches of the kernels whose names start with `prefix` (e.g.
// "affine_") the calling OS thread made.
extern "C" unsigned long long syncbn_emu_launches_named(const char* prefix);

// Defers `work` on `stream` of the calling thread's current context.
extern "C" void syncbn_emu_defer(void* stream, const std::shared_ptr<cuda_emulator::PendingWork>* work);
