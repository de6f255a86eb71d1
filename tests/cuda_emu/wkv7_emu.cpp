// The kernels of cuda/wkv7.cu built for the CPU emulation: one C entry point per instantiation, named
// after its template arguments (`wkv7_forward__bf16_t__64__4` for `wkv7_forward<bf16_t, 64, 4>`),
// taking (grid x, grid y, block x, kernel argument pointers) and returning emu::launch's status.
#include "cuda_emu.h"
#include "wkv7.cu"

#define EMU_ENTRY(name, kernel)                                                                   \
    extern "C" int name(unsigned gx, unsigned gy, unsigned bx, void** args) {                     \
        return emu::launch(kernel, dim3{gx, gy, 1}, dim3{bx, 1, 1}, args);                        \
    }
#define EMU_SEQUENCE(F, N, P)                                                                     \
    EMU_ENTRY(wkv7_forward__##F##__##N##__##P, (wkv7_forward<F, N, P>))                          \
    EMU_ENTRY(wkv7_backward__##F##__##N##__##P, (wkv7_backward<F, N, P>))
#define EMU_DECODE(F, N) EMU_ENTRY(wkv7_decode__##F##__##N, (wkv7_decode<F, N>))

EMU_SEQUENCE(float, 64, 1)
EMU_SEQUENCE(bf16_t, 64, 1)
EMU_SEQUENCE(fp16_t, 64, 1)
EMU_SEQUENCE(float, 64, 2)
EMU_SEQUENCE(float, 64, 4)
EMU_SEQUENCE(float, 32, 1)
EMU_DECODE(float, 64)
EMU_DECODE(bf16_t, 64)
EMU_DECODE(fp16_t, 64)
