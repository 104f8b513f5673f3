"""Build of sparge._C: the C backend, the pybind11 bindings and, when nvcc is
found, the CUDA backend.

Knobs (environment variables):
  SPARGE_CUDA=0            skip the CUDA sources even if nvcc exists
  SPARGE_CUDA_ARCHS        ';'-separated list, default "80;90a"; every CUDA unit
                           is compiled for each (one image per arch), except
                           the sm90-only units (below)
  SPARGE_CPU_ARCH          -march value for the C backend, default "native";
                           "none" builds portable code (for wheels built on
                           one machine and installed on another)
  CUDA_HOME                CUDA toolkit root (default: from nvcc's location)
  SPARGE_BUILD_JOBS        parallel nvcc jobs (default: CPU count)

CUDA units named *_sm90*.cu (in csrc/cuda and csrc/cuda/inst) use sm_90a-only
instructions (wgmma, TMA, setmaxnreg): they are compiled for 90a alone, and
skipped when 90a is not in SPARGE_CUDA_ARCHS. Every unit sees
SPARGE_CUDA_SM90=1 exactly when they are built, so that the kernel registry
(csrc/cuda/registry.cu) lists the sm90 kernels only then. Device code carries
line info (-lineinfo, for profilers) and ptxas reports register spills and
local-memory use as warnings.

The build needs setuptools and pybind11 only: no torch headers are included.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(folder, suffix):
    path = os.path.join(ROOT, folder)
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(path) if f.endswith(suffix))


C_SOURCES = ["csrc/api.c"] + _sources("csrc/cpu", ".c")
CU_SOURCES = _sources("csrc/cuda", ".cu") + _sources("csrc/cuda/inst", ".cu")


def _sm90_only(src):
    """Units that use sm_90a-only instructions, by the naming convention above."""
    return "_sm90" in os.path.basename(src)


def _compiler_accepts(compiler_cmd, flags):
    """True when the C compiler builds an empty OpenMP-using unit with flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("int main(void) { return 0; }\n")
        cmd = list(compiler_cmd) + flags + [src, "-o", os.path.join(tmp, "t")]
        try:
            return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        except OSError:
            return False


def _find_cuda():
    """(nvcc path, CUDA root) or (None, None)."""
    if os.environ.get("SPARGE_CUDA", "1") == "0":
        return None, None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None, None
    if not home:
        home = "/usr/local/cuda" if os.path.isdir("/usr/local/cuda/lib64") else os.path.dirname(
            os.path.dirname(os.path.realpath(nvcc)))
    return nvcc, home


def _cuda_libdir(home):
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        d = os.path.join(home, sub)
        if os.path.exists(os.path.join(d, "libcudart_static.a")):
            return d
    return None


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[:1]
        openmp = ["-fopenmp"] if _compiler_accepts(cc, ["-fopenmp"]) else []
        march = os.environ.get("SPARGE_CPU_ARCH", "native")
        arch_flags = [] if march == "none" else [f"-march={march}"]
        if arch_flags and not _compiler_accepts(cc, arch_flags):
            arch_flags = []
        c_flags = ["-std=c11", "-O3", "-fno-math-errno", "-Wall", "-Wextra", "-fvisibility=hidden"] + arch_flags + openmp
        cxx_flags = ["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall"]

        ext = self.extensions[0]
        nvcc, home = _find_cuda()
        libdir = _cuda_libdir(home) if nvcc else None
        if nvcc and libdir and CU_SOURCES:
            archs = [a for a in os.environ.get("SPARGE_CUDA_ARCHS", "80;90a").split(";") if a]
            with_sm90 = "90a" in archs

            def gencode(arch_list):
                flags = []
                for a in arch_list:
                    flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
                return flags

            units = [(src, gencode(["90a"] if _sm90_only(src) else archs))
                     for src in CU_SOURCES if with_sm90 or not _sm90_only(src)]
            defines = ["-DSPARGE_WITH_CUDA"] + (["-DSPARGE_CUDA_SM90=1"] if with_sm90 else [])
            os.makedirs(self.build_temp, exist_ok=True)
            objs = [os.path.join(self.build_temp, src.replace("/", "_") + ".o") for src, _ in units]

            def compile_cu(src, arch_flags, obj):
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                       "-Xptxas", "-warn-spills,-warn-lmem-usage",
                       "-Xcompiler", "-fPIC,-fvisibility=hidden", "-Icsrc/include", "-Icsrc"] + defines + arch_flags
                print(" ".join(cmd), file=sys.stderr)
                subprocess.check_call(cmd, cwd=ROOT)

            # instantiation units are independent: compile them side by side
            jobs = int(os.environ.get("SPARGE_BUILD_JOBS", os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                for f in [pool.submit(compile_cu, src, flags, obj) for (src, flags), obj in zip(units, objs)]:
                    f.result()
            ext.extra_objects = list(ext.extra_objects or []) + objs
            # setuptools relinks only when a dependency is newer than the module;
            # the objects just built always are, so CUDA edits reach the module
            ext.depends = list(ext.depends or []) + objs
            ext.define_macros = list(ext.define_macros or []) + [("SPARGE_WITH_CUDA", "1")]
            ext.library_dirs = list(ext.library_dirs or []) + [libdir]
            ext.extra_link_args = list(ext.extra_link_args or []) + ["-lcudart_static", "-ldl", "-lrt", "-lpthread"]
            print(f"sparge: CUDA backend enabled ({nvcc}, archs {archs})", file=sys.stderr)
        else:
            print("sparge: CUDA backend not built (no nvcc, no libcudart_static, or SPARGE_CUDA=0)", file=sys.stderr)
        ext.extra_link_args = list(ext.extra_link_args or []) + openmp

        original = self.compiler._compile

        def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            flags = c_flags if src.endswith(".c") else cxx_flags
            # Pybind11Extension's own C++ flags (-std=c++17 etc.) don't suit C files.
            if src.endswith(".c"):
                extra_postargs = [f for f in extra_postargs if not f.startswith("-std=") and f != "-fvisibility=hidden"]
            return original(obj, src, ext_, cc_args, list(extra_postargs) + flags, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "sparge._C",
        ["csrc/bindings.cpp"] + C_SOURCES,
        include_dirs=["csrc/include", "csrc"],
        cxx_std=17,
        language="c++",
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
