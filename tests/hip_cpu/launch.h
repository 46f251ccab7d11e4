// Launches a kernel entry of cuda/cross_entropy.cu from an argument list built
// by src/kernel_abi/, the way cuLaunchKernel takes one: an array of pointers
// to each argument's value. Before launching it checks the list against the
// entry's C++ parameter list: the count, and each argument's size and kind
// (pointer, integer or float), so that a marshalling mistake fails the test
// instead of reading garbage (tests/kernels_on_cpu.rs only).
#pragma once

#include <cstddef>
#include <cstdio>
#include <type_traits>
#include <utility>

template <typename P> constexpr char kind_of() {
    return std::is_pointer_v<P> ? 'p' : std::is_floating_point_v<P> ? 'f' : 'i';
}

template <typename... P, std::size_t... I>
void launch_unpacked(void (*kernel)(P...), unsigned blocks, unsigned threads, void** args,
                     std::index_sequence<I...>) {
    hipLaunchKernelGGL(kernel, dim3(blocks), dim3(threads), 0, nullptr, *static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <typename... P>
int launch_checked(void (*kernel)(P...), const char* entry, unsigned blocks, unsigned threads, void** args,
                   const char* kinds, const std::size_t* sizes, int count, char* error, std::size_t error_len) {
    constexpr std::size_t expected_sizes[] = {sizeof(P)..., 0};
    constexpr char expected_kinds[] = {kind_of<P>()..., 0};
    if (count != int(sizeof...(P))) {
        std::snprintf(error, error_len, "%s takes %d arguments, got %d", entry, int(sizeof...(P)), count);
        return 1;
    }
    for (int i = 0; i < count; ++i) {
        if (sizes[i] != expected_sizes[i] || kinds[i] != expected_kinds[i]) {
            std::snprintf(error, error_len, "%s argument %d: expected kind %c of %zu bytes, got kind %c of %zu bytes",
                          entry, i, expected_kinds[i], expected_sizes[i], kinds[i], sizes[i]);
            return 1;
        }
    }
    launch_unpacked(kernel, blocks, threads, args, std::index_sequence_for<P...>{});
    if (hipDeviceSynchronize() != hipSuccess) {
        std::snprintf(error, error_len, "%s: hipDeviceSynchronize failed", entry);
        return 1;
    }
    return 0;
}
