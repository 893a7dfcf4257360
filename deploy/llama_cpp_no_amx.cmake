# Passed to llama-cpp-python's build as -DCMAKE_PROJECT_INCLUDE=<this file> (README, .ci/run): CMake
# includes it after every project() call, before llama.cpp's targets are made.
#
# Why: pip builds llama.cpp with GGML_NATIVE=ON, i.e. -march=native. On a CPU with AMX (every Intel
# Xeon since Sapphire Rapids) that defines __AMX_INT8__, which compiles in ggml's AMX matmul kernels
# for quantized types. On kernels that gate AMX tile state per thread (XFD, Linux >= 5.16), llama.cpp
# asks for the permission on its main thread only, so its worker threads die with SIGILL
# (upstream llama.cpp pull request #26954, open on 2026-12-01). llama.cpp's own GGML_AMX_* options
# are read only with GGML_NATIVE=OFF, which would also drop the AVX-512 paths the CPU has, so we
# keep -march=native and take AMX out of it: an explicit -mno-* wins over -march whatever the order.
# Drop this file (and the flag) once a llama-cpp-python release vendors the upstream fix.
include_guard(GLOBAL)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|x86|i[3-6]86)$" AND NOT MSVC)
  include(CheckCCompilerFlag)
  check_c_compiler_flag(-mno-amx-int8 CERBERO_CC_HAS_MNO_AMX)
  if(CERBERO_CC_HAS_MNO_AMX)
    message(STATUS "cerbero-ray: llama.cpp built without AMX kernels (-mno-amx-int8 -mno-amx-bf16 -mno-amx-tile)")
    add_compile_options(-mno-amx-int8 -mno-amx-bf16 -mno-amx-tile)
  endif()
endif()
