// Every kernel source in this folder is compiled once per CPU path (CMakeLists.txt), with
// KX_CPU_PATH naming the path's namespace: kx::cpu::baseline (the build's -march) and, on
// x86-64, kx::cpu::avx2. Include this header LAST. For the avx2 path it turns AVX2 on only for
// what is declared after it, so the inline functions and templates of the headers above (ours
// and the standard library's) keep baseline out-of-line copies: the linker merges those copies
// across paths, so none may hold an AVX2 instruction. Inlined into this path's kernels, they
// are compiled with AVX2.
#pragma once
#if !defined(KX_CPU_PATH)
#error "csrc/cpu kernel sources are compiled with -DKX_CPU_PATH=<path> (see CMakeLists.txt)"
#endif

#include "../kernels.h"

#if defined(KX_CPU_AVX2)
// ISA flags only, no arch=: GCC inlines a baseline function into these only if the arch matches.
#pragma GCC target("avx2,fma,bmi,bmi2")
#endif

namespace kx::cpu::KX_CPU_PATH {
#include "../kernel_api.h"
}  // namespace kx::cpu::KX_CPU_PATH
