#!/usr/bin/env bash
# The kernels built in two steps, as for the GPU results in benchmarks/results/: the device code
# (csrc/gqsa_kernels.cu, torch-free) compiled with nvcc on any machine, even one without a GPU,
# then linked with the torch bindings on the GPU machine into vllm_gqsa/_C, which the plugin
# imports before trying a JIT build. The link takes seconds where the JIT build takes minutes.
#   bash benchmarks/prebuilt_kernels.sh compile OBJ   # ARCH=90a by default (sm_90a)
#   bash benchmarks/prebuilt_kernels.sh link OBJ      # in vLLM's environment (its torch and CUDA)
# compile also keeps the bindings and header the object was built with (OBJ.csrc/), and link uses
# them, so that builds from different commits can be linked in turn for an A/B in one call.
set -euo pipefail
step=$1 obj=$2
cd "$(dirname "$0")/.."
case $step in
  compile)
    arch=${ARCH:-90a}
    nvcc -c -std=c++17 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC \
      -gencode=arch=compute_$arch,code=sm_$arch csrc/gqsa_kernels.cu -o "$obj"
    mkdir -p "$obj.csrc" && cp csrc/torch_bindings.cpp csrc/gqsa_kernels.h "$obj.csrc/" ;;
  link)
    eval "$(python3 - <<'PY'
import os, sysconfig, torch
from torch.utils import cpp_extension as ce
print("INC='%s'" % " ".join("-I" + p for p in ce.include_paths("cuda")))
print("TLIB=%s" % os.path.join(os.path.dirname(torch.__file__), "lib"))
print("PYINC=%s" % sysconfig.get_paths()["include"])
print("EXT=%s" % sysconfig.get_config_var("EXT_SUFFIX"))
print("ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
print("CUDA=%s" % (ce.CUDA_HOME or "/usr/local/cuda"))
PY
)"
    # The same flags as setup.py's build; _C's module init lives in torch_bindings.cpp.
    src=csrc
    [[ -f $obj.csrc/torch_bindings.cpp ]] && src=$obj.csrc
    g++ -O3 -std=c++17 -fPIC -shared -D_GLIBCXX_USE_CXX11_ABI=$ABI -DTORCH_API_INCLUDE_EXTENSION_H \
      -DTORCH_EXTENSION_NAME=_C $INC -I"$PYINC" -I"$src" "$src/torch_bindings.cpp" "$obj" \
      -L"$TLIB" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -L"$CUDA/lib64" -lcudart \
      -Wl,-rpath,"$TLIB" -o "vllm_gqsa/_C$EXT"
    python3 -c "from vllm_gqsa.kernels import cuda; print('GQSA CUDA kernels:', cuda.available())" ;;
  *) echo "usage: $0 compile|link OBJ" >&2; exit 2 ;;
esac
