// The kernels of cuda/wkv7.cu built for the CPU emulation: one C entry point per instantiation,
// named `<kernel>__<dtype>__<head size>`, taking (grid x, grid y, block x, kernel argument pointers).
#include "cuda_emu.h"
#include "wkv7.cu"

#define EMU_ENTRY(kernel, F, N)                                                                      \
    extern "C" void kernel##__##F##__##N(unsigned gx, unsigned gy, unsigned bx, void** args) {       \
        emu::launch(kernel<F, N>, dim3{gx, gy, 1}, dim3{bx, 1, 1}, args);                            \
    }
#define EMU_ALL_KERNELS(F, N) EMU_ENTRY(wkv7_forward, F, N) EMU_ENTRY(wkv7_backward, F, N) EMU_ENTRY(wkv7_decode, F, N)

EMU_ALL_KERNELS(float, 64)
EMU_ALL_KERNELS(bf16_t, 64)
EMU_ALL_KERNELS(fp16_t, 64)
EMU_ALL_KERNELS(float, 32)
