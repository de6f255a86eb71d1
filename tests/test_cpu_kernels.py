"""The CPU kernels' build: the instruction-set cap, and the C source compiling for the other architecture.

(What the kernels compute is tested in test_fast.py and test_wkv7.py, at every level this CPU has, and at
aarch64's levels under qemu in test_cpu_kernels_aarch64.py.)"""
import shutil
import subprocess

import pytest
import torch

from rwkv_lm.ops.cpu_kernels import COMPILE_FLAGS, ISA_ENV, LEVELS, SOURCE, cpu_level, isa_level, kernels


def test_isa_cap(monkeypatch):
    """RWKV_LM_CPU_ISA caps the level (never raises it above the CPU's); a wrong name says what fits."""
    monkeypatch.setenv(ISA_ENV, LEVELS[-1].upper())
    assert isa_level() == cpu_level(), "a cap at the top level (in any case) leaves the CPU's own"
    monkeypatch.setenv(ISA_ENV, "generic")
    assert isa_level() == "generic" and kernels().level == "generic"
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="RWKV_LM_CPU_ISA='sse9' is not a level.*generic"):
        kernels()


@pytest.mark.parametrize("march", ["armv8-a", "armv8-a+nosimd"], ids=["neon", "generic"])
def test_kernels_cross_compile_for_aarch64(tmp_path, march):
    """The source builds for aarch64 as the neon and generic levels do there (Debian's gcc-aarch64-linux-gnu;
    `make setup-test` installs it), with no warning."""
    compiler = shutil.which("aarch64-linux-gnu-gcc")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu, as make setup-test does)")
    lib = tmp_path / "cpu_kernels.so"
    build = subprocess.run([compiler, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra",
                            "-Werror", "-o", str(lib), str(SOURCE), "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for name in ("gemv_f32", "gemv_bf16", "gemv_i8", "wkv7_f32", "block_step", "block_step_params", "rows_per_pass"):
        assert f" {name}\n" in symbols, f"{name} missing from the aarch64 build"


X86_ONLY = pytest.mark.skipif(LEVELS[-1] != "amx", reason="x86 levels only")


@X86_ONLY
@pytest.mark.parametrize("level", LEVELS)
def test_kernels_compile_at_every_x86_level(tmp_path, level):
    """Every level's code compiles warning-free, those above this CPU's too (built, never run: a CI machine
    without AMX still compiles the AMX tiles' code)."""
    probe = subprocess.run(["cc", *COMPILE_FLAGS[level], "-x", "c", "-c", "-o", str(tmp_path / "probe.o"), "/dev/null"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"this compiler does not take the {level} level's flags (AMX: GCC 11, clang 12): {probe.stderr[:200]}")
    build = subprocess.run(["cc", "-O3", *COMPILE_FLAGS[level], "-fopenmp", "-pthread", "-shared", "-fPIC", "-Wall",
                            "-Wextra", "-Werror", "-o", str(tmp_path / "k.so"), str(SOURCE), "-lm"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr


@X86_ONLY
def test_a_compiler_without_a_levels_flags_builds_the_level_below(refusing_compiler):
    """A compiler older than the CPU (no -mamx-tile before GCC 11) gives the level below, with a warning that
    says so, not torch ops."""
    from rwkv_lm.ops import cpu_kernels

    top, below = LEVELS[-1], LEVELS[-2]
    flag = next(f for f in COMPILE_FLAGS[top] if f not in COMPILE_FLAGS[below])
    refusing_compiler(flag, f"cc: error: unrecognized command-line option '{flag}'")
    cpu_kernels._build.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"could not be built for {top} .*{flag}.*built for {below} instead"):
            built = cpu_kernels._build(top)  # loaded, not run: this CPU need not have the level
        assert built.level == below and set(built) == set(cpu_kernels.SIGNATURES)
    finally:
        cpu_kernels._build.cache_clear()


@X86_ONLY
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_weights_in_quads_give_the_same_bits_at_every_level(weights):
    """int8 and int4 weights in quads take the same integer sums and float operations at every level that stores them
    so (AVX2's vpmaddubsw and vpmaddwd, VNNI's vpdpbusd): a model's logits do not depend on which of them the CPU
    has. Needs two such levels (a CPU with AVX-512)."""
    from rwkv_lm.runtime.cpu import KernelLinear

    quads = "int8_quads" if weights == "int8" else "int4_quads"
    levels = [level for level in LEVELS[:LEVELS.index(cpu_level()) + 1] if getattr(kernels(level), quads, False)]
    if len(levels) < 2:
        pytest.skip(f"{weights} weights in quads at {levels or 'no level'} here: nothing to compare")
    torch.manual_seed(1)
    linear = torch.nn.Linear(768, 100, bias=False)
    x = torch.randn(35, 768)
    outputs = {}
    for level in levels:
        fast = KernelLinear(linear, torch.int8 if weights == "int8" else torch.uint8, isa=level)
        outputs[level] = [fast(x[:n]) for n in (1, 3, 35)]
    for level in levels[1:]:
        for got, expected in zip(outputs[level], outputs[levels[0]]):
            assert torch.equal(got, expected), f"{level} and {levels[0]} differ"
