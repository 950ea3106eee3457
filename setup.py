"""Build imbreg_fast and its C++ extensions.

Extensions (all optional; the package works without them on the pure-PyTorch backend):
  imbreg_fast._C            operator schemas (csrc/*.cpp), always built with the extension
  imbreg_fast._C_default    CPU kernels (csrc/cpu/*.cpp) for any x86-64 / other CPU
  imbreg_fast._C_avx2       the same kernels compiled with -mavx2 -mfma (x86-64 only)
  imbreg_fast._C_avx512     the same kernels compiled with AVX-512 F/BW/VL/DQ (x86-64, when the compiler can)
  imbreg_fast._C_cuda       CUDA kernels (csrc/cuda/*.cu), only with a CUDA toolkit AND a CUDA build of torch

At import, imbreg_fast loads _C and ONE kernel library, picked from
torch.backends.cpu.get_cpu_capability() exactly as PyTorch picks its own kernels.

Switches (environment variables):
  IMBREG_SKIP_EXT=1         pure-Python install, no extension at all
  IMBREG_CPU_CAPABILITIES   comma list among default,avx2,avx512 (default: all the compiler supports)
  IMBREG_FORCE_CPU=1        never build CUDA sources even when possible
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import platform
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["imbreg_fast", "imbreg_fast.*"]) + ["imbreg_fast.triton_kernels"]
PACKAGE_DIR = {"imbreg_fast.triton_kernels": "triton_kernels"}

CAPABILITY_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512"],
}


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _compiler_accepts(flags):
    """Does the C++ compiler accept these flags (e.g. AVX-512 on an old gcc)?"""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            res = subprocess.run([cxx, *flags, "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True)
        except OSError:
            return False
        return res.returncode == 0


def _extensions():
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    import torch

    schema_sources = sorted(glob.glob("csrc/*.cpp"))
    kernel_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    wanted = os.environ.get("IMBREG_CPU_CAPABILITIES", "default,avx2,avx512").split(",")
    capabilities = []
    for cap in (c.strip().lower() for c in wanted if c.strip()):
        if cap not in CAPABILITY_FLAGS:
            raise ValueError(f"IMBREG_CPU_CAPABILITIES: unknown capability {cap!r}; "
                             f"choose among {sorted(CAPABILITY_FLAGS)}")
        if cap != "default" and not (is_x86 and _compiler_accepts(CAPABILITY_FLAGS[cap])):
            print(f"imbreg_fast: skipping the {cap} kernels (compiler or architecture cannot build them)")
            continue
        capabilities.append(cap)
    if "default" not in capabilities:
        capabilities.insert(0, "default")

    common = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
              "-DTORCH_API_INCLUDE_EXTENSION_H"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    exts = [CppExtension("imbreg_fast._C", schema_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": common + ["-DIMBREG_EXT_NAME=_C"]})]
    for cap in capabilities:
        name = f"_C_{cap}"
        flags = common + CAPABILITY_FLAGS[cap] + [f"-DCPU_CAPABILITY={cap.upper()}",
                                                  f"-DIMBREG_EXT_NAME={name}"]
        exts.append(CppExtension(f"imbreg_fast.{name}", kernel_sources, include_dirs=include_dirs,
                                 extra_compile_args={"cxx": flags + ["-fopenmp"]},
                                 extra_link_args=["-fopenmp"]))

    cuda_possible = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    build_cuda = cuda_possible and not _env_flag("IMBREG_FORCE_CPU")
    if build_cuda:
        exts.append(CUDAExtension("imbreg_fast._C_cuda", cuda_sources + ["csrc/cpu/module.cpp"],
                                  include_dirs=include_dirs,
                                  extra_compile_args={"cxx": common + ["-DIMBREG_EXT_NAME=_C_cuda"],
                                                      "nvcc": ["-O3"]}))

    print("imbreg_fast build configuration:")
    print(f"  torch {torch.__version__} (CUDA build: {torch.version.cuda is not None})")
    print(f"  schema sources: {schema_sources}")
    print(f"  CPU kernel sources: {kernel_sources}")
    print(f"  CPU capabilities: {capabilities} (machine: {platform.machine()})")
    print(f"  CUDA sources: {cuda_sources or 'none'}; building CUDA: {build_cuda}"
          f" (toolkit: {CUDA_HOME}, torch CUDA: {torch.version.cuda})")
    print(f"  MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}")
    return exts


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class SafeInplaceBuildExtension(BuildExtension):
        """Replace in-place .so files by unlink + copy, so a running process that has the old
        library mapped keeps working instead of crashing on a truncated file."""

        def build_extension(self, ext):
            # The kernel libraries share their sources: give each its own object directory, or the
            # capabilities overwrite each other's objects and every build recompiles everything.
            build_temp = self.build_temp
            self.build_temp = os.path.join(build_temp, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = build_temp

        def copy_file(self, infile, outfile, *args, **kwargs):
            if outfile.endswith(".so") and os.path.exists(outfile):
                os.unlink(outfile)
            return super().copy_file(infile, outfile, *args, **kwargs)

    return SafeInplaceBuildExtension.with_options(use_ninja=True)


if _env_flag("IMBREG_SKIP_EXT"):
    print("imbreg_fast build configuration: IMBREG_SKIP_EXT=1, pure-Python install (PyTorch backend only)")
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = _extensions(), {"build_ext": _build_ext_class()}

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
