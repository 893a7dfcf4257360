# Passed to llama-cpp-python's build as -DCMAKE_PROJECT_INCLUDE=<this file> (README, .ci/run): CMake
# includes it after every project() call, before that project's targets are made. Two changes, each
# leaving the Python package's libraries what they were meant to be.
#
# 1. No llama.cpp "common" library when the multimodal one is off (-DLLAVA_BUILD=OFF). llama-cpp-python
#    forces LLAMA_BUILD_COMMON=ON, but only its multimodal library (tools/mtmd) links common; the
#    package loads libllama and libggml*. Common (argument parsing, chat templates, JSON) is half
#    of the compile: 103 s instead of 197 s for the whole wheel on 2 cores (AMD EPYC, 0.3.36), same
#    libraries in llama_cpp/lib. A normal variable in llama.cpp's scope wins over the cached ON
#    (its option() honours it: CMP0077), and its `if (LLAMA_BUILD_COMMON)` then skips common.
if(PROJECT_NAME STREQUAL "llama.cpp" AND DEFINED LLAVA_BUILD AND NOT LLAVA_BUILD)
  message(STATUS "cerbero-ray: llama.cpp's common library not built (only the multimodal library uses it)")
  set(LLAMA_BUILD_COMMON OFF)
endif()

# 2. No AMX kernels. pip builds llama.cpp with GGML_NATIVE=ON, i.e. -march=native. On a CPU with AMX
#    (every Intel Xeon since Sapphire Rapids) that defines __AMX_INT8__, which compiles in ggml's AMX
#    matmul kernels for quantized types. On kernels that gate AMX tile state per thread (XFD, Linux
#    >= 5.16), llama.cpp asks for the permission on its main thread only, so its worker threads die
#    with SIGILL (upstream llama.cpp pull request #26954, open on 2026-12-01). llama.cpp's own
#    GGML_AMX_* options are read only with GGML_NATIVE=OFF, which would also drop the AVX-512 paths
#    the CPU has, so we keep -march=native and take AMX out of it: an explicit -mno-* wins over
#    -march whatever the order. Drop this part once a llama-cpp-python release vendors the upstream
#    fix. Once, at the first project() (llama-cpp-python's own): its options reach every directory
#    below.
include_guard(GLOBAL)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|x86|i[3-6]86)$" AND NOT MSVC)
  include(CheckCCompilerFlag)
  check_c_compiler_flag(-mno-amx-int8 CERBERO_CC_HAS_MNO_AMX)
  if(CERBERO_CC_HAS_MNO_AMX)
    message(STATUS "cerbero-ray: llama.cpp built without AMX kernels (-mno-amx-int8 -mno-amx-bf16 -mno-amx-tile)")
    add_compile_options(-mno-amx-int8 -mno-amx-bf16 -mno-amx-tile)
  endif()
endif()
