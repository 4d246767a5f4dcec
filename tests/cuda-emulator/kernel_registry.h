// The emulated driver's kernel registry (see fake_driver.cpp): kernels
// compiled for the host, found by name, called with cuLaunchKernel-style
// parameters (an array of pointers to each argument's value).
#pragma once

#include <cstddef>
#include <initializer_list>
#include <utility>

namespace cuda_emulator {

using Invoker = void (*)(void* fn, void** params);

struct Kernel {
    void* fn;
    Invoker invoke;
};

template <typename... A, std::size_t... I>
void call_with(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<A*>(params[I])...);
}

// Calls `fn` (of type void(A...)) with cuLaunchKernel-style parameters.
template <typename... A> void invoker(void* fn, void** params) {
    call_with(reinterpret_cast<void (*)(A...)>(fn), params, std::index_sequence_for<A...>{});
}

template <typename... A> Kernel kernel(void (*f)(A...)) {
    return Kernel{reinterpret_cast<void*>(f), &invoker<A...>};
}

// Adds kernels to the registry (defined in fake_driver.cpp; called by the
// static initializers of the generated registries of candle's kernels).
bool register_kernels(std::initializer_list<std::pair<const char*, Kernel>> kernels);

}  // namespace cuda_emulator

#define SYNCBN_KERNEL(name) std::pair<const char*, ::cuda_emulator::Kernel>{#name, ::cuda_emulator::kernel(&name)}
