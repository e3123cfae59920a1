# Turns one .cu into C++ for the CUDA emulation of the native tests
# (pn_cuda_emu.h). Two rewrites, nothing else changes:
#   name<targs><<<config>>>(args...)
#     ->  ::pn_emu::Launch(config).run(name<targs>, args...)
#   __shared__ T name[dims];
#     ->  static T name[dims]; static ::pn_emu::SharedVar pn_emu_shared_name(&name, sizeof name);
# (the second line registers the variable, so the emulation can fill it with
# garbage before every block, as shared memory starts undefined on a GPU).
# Every launch and shared variable in csrc/cuda has one of these forms; any
# `<<<` or `__shared__` left over is an error, so code written another way
# fails the build instead of being skipped. Usage:
#   cmake -DIN=<file.cu> -DOUT=<file.cpp> -P cuda_to_cpp.cmake
if(NOT IN OR NOT OUT)
  message(FATAL_ERROR "usage: cmake -DIN=<file.cu> -DOUT=<file.cpp> -P cuda_to_cpp.cmake")
endif()
file(READ "${IN}" src)
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_]*<[^;<>]*>)<<<([^;]*)>>>\\("
       "::pn_emu::Launch(\\2).run(\\1, " out "${src}")
string(REGEX REPLACE "__shared__ ([A-Za-z_][A-Za-z0-9_:]*) ([A-Za-z_][A-Za-z0-9_]*)([^;]*);"
       "static \\1 \\2\\3; static ::pn_emu::SharedVar pn_emu_shared_\\2(&\\2, sizeof \\2);"
       out "${out}")
foreach(left "<<<" "__shared__")
  string(FIND "${out}" "${left}" at)
  if(NOT at EQUAL -1)
    message(FATAL_ERROR "${IN}: a `${left}` the rewrite does not understand (see cuda_to_cpp.cmake)")
  endif()
endforeach()
# Diagnostics and sanitizer reports point at the .cu, not at this copy.
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${out}")
# Only touch OUT when it changed: an unchanged rewrite recompiles nothing.
execute_process(COMMAND "${CMAKE_COMMAND}" -E copy_if_different "${OUT}.tmp" "${OUT}")
file(REMOVE "${OUT}.tmp")
