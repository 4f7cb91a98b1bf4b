// Every kernel source in this folder is compiled once per CPU path (CMakeLists.txt), with
// KX_CPU_PATH naming the path's namespace: kx::cpu::baseline (the build's -march) and, on
// x86-64, kx::cpu::avx2 and kx::cpu::avx512. Include this header LAST. For the avx2 and avx512
// paths it turns their instructions on only for what is declared after it, so the inline
// functions and templates of the headers above (ours and the standard library's) keep baseline
// out-of-line copies: the linker merges those copies across paths, so none may hold an AVX2
// instruction. Inlined into a path's kernels, they are compiled with its instructions. The
// avx512 path also defines KX_CPU_AVX2: its AVX2 intrinsics code runs there as it is.
#pragma once
#if !defined(KX_CPU_PATH)
#error "csrc/cpu kernel sources are compiled with -DKX_CPU_PATH=<path> (see CMakeLists.txt)"
#endif

#include "../kernels.h"

// ISA flags only, no arch=: GCC inlines a baseline function into these only if the arch matches.
#if defined(KX_CPU_AVX512)
// 512-bit vectors where GCC vectorises (its generic tuning would keep 256): twice the FMAs an
// instruction, and the cores that have AVX-512 have two 512-bit FMA pipes.
#pragma GCC target("avx2,fma,bmi,bmi2,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
// GCC's AVX-512 intrinsics pass an "undefined" vector initialised from itself, which -Wall
// reports wherever they are inlined; the same sources compile for the other paths with it on.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(KX_CPU_AVX2)
#pragma GCC target("avx2,fma,bmi,bmi2")
#endif

namespace kx::cpu::KX_CPU_PATH {
#include "../kernel_api.h"
}  // namespace kx::cpu::KX_CPU_PATH
