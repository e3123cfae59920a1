# Rewrites the kernel launches of one .cu for the CUDA emulation of the native
# tests (pn_cuda_emu.h):
#   name<targs><<<config>>>(args...)  ->  ::pn_emu::Launch(config).run(name<targs>, args...)
# Every launch in csrc/cuda is of that form (a templated kernel name); any
# `<<<` left over is an error, so a launch written another way fails the build
# instead of being skipped. Usage:
#   cmake -DIN=<file.cu> -DOUT=<file.cpp> -P rewrite_launches.cmake
if(NOT IN OR NOT OUT)
  message(FATAL_ERROR "usage: cmake -DIN=<file.cu> -DOUT=<file.cpp> -P rewrite_launches.cmake")
endif()
file(READ "${IN}" src)
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_]*<[^;<>]*>)<<<([^;]*)>>>\\("
       "::pn_emu::Launch(\\2).run(\\1, " out "${src}")
string(FIND "${out}" "<<<" left)
if(NOT left EQUAL -1)
  message(FATAL_ERROR "${IN}: a kernel launch the rewrite does not understand (expected name<...><<<...>>>(...))")
endif()
# Diagnostics and sanitizer reports point at the .cu, not at this copy.
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${out}")
# Only touch OUT when it changed: an unchanged rewrite recompiles nothing.
execute_process(COMMAND "${CMAKE_COMMAND}" -E copy_if_different "${OUT}.tmp" "${OUT}")
file(REMOVE "${OUT}.tmp")
