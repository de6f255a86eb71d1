// The kernels of cuda/rwkv7_step.cu built for the CPU emulation, one C entry point per instantiation as in
// wkv7_emu.cpp (`step_time_mix__bf16_t__64` for `step_time_mix<bf16_t, 64>`).
#include "cuda_emu.h"
#include "rwkv7_step.cu"

#define EMU_ENTRY(name, kernel)                                                                   \
    extern "C" int name(unsigned gx, unsigned gy, unsigned bx, void** args) {                     \
        return emu::launch(kernel, dim3{gx, gy, 1}, dim3{bx, 1, 1}, args);                        \
    }
#define EMU_STEP(F)                                                                               \
    EMU_ENTRY(step_mix__##F, (step_mix<F>))                                                       \
    EMU_ENTRY(step_lora__##F, (step_lora<F>))                                                     \
    EMU_ENTRY(step_time_mix__##F##__32, (step_time_mix<F, 32>))                                   \
    EMU_ENTRY(step_time_mix__##F##__64, (step_time_mix<F, 64>))                                   \
    EMU_ENTRY(step_ffn_mix__##F, (step_ffn_mix<F>))                                               \
    EMU_ENTRY(step_relu_sq__##F, (step_relu_sq<F>))

EMU_STEP(float)
EMU_STEP(bf16_t)
EMU_STEP(fp16_t)
