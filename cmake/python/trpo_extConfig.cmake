# trpo_ext's CMake package as shipped inside the Python package (trpo_ext/share/cmake/trpo_ext/, found
# through `trpo_ext.cmake_prefix_path`).  The wheel carries the C++ sources rather than a compiled
# library, so this file builds the static library trpo_ext::trpo_ext from them inside the consumer's
# project, with the consumer's compiler and libtorch: no ABI to match.  CPU kernels by default; set
# TRPO_EXT_WITH_CUDA=ON (with the CUDA language enabled) to add the CUDA kernels.
#
#   find_package(Torch REQUIRED)
#   find_package(trpo_ext REQUIRED)
#   target_link_libraries(app PRIVATE trpo_ext::trpo_ext)
include(CMakeFindDependencyMacro)
find_dependency(Torch)

if(NOT TARGET trpo_ext::trpo_ext)
  get_filename_component(_trpo_ext_root "${CMAKE_CURRENT_LIST_DIR}/../../trpo_ext" ABSOLUTE)
  set(_trpo_ext_src "${_trpo_ext_root}/src")
  set(_trpo_ext_sources "${_trpo_ext_src}/cg_solver.cpp" "${_trpo_ext_src}/cpu/cg_cpu.cpp")
  if(TRPO_EXT_WITH_CUDA)
    list(APPEND _trpo_ext_sources "${_trpo_ext_src}/cuda/cg_cuda.cu")
  endif()
  add_library(trpo_ext_cg STATIC ${_trpo_ext_sources})
  set_target_properties(trpo_ext_cg PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_include_directories(trpo_ext_cg PUBLIC "${_trpo_ext_root}/include"
                             PRIVATE "${_trpo_ext_src}")
  target_compile_definitions(trpo_ext_cg PRIVATE TRPO_EXT_NO_OP_REGISTRATION
                             $<$<BOOL:${TRPO_EXT_WITH_CUDA}>:TRPO_EXT_WITH_CUDA>)
  target_compile_options(trpo_ext_cg PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
  target_compile_features(trpo_ext_cg PUBLIC cxx_std_20)
  # CPU-only: torch's CPU library alone (${TORCH_LIBRARIES} of a CUDA build of torch also names CUDA
  # libraries, such as nvrtc, that a minimal toolkit lacks).
  if(TRPO_EXT_WITH_CUDA)
    target_link_libraries(trpo_ext_cg PUBLIC ${TORCH_LIBRARIES})
  else()
    target_link_libraries(trpo_ext_cg PUBLIC torch_cpu c10)
  endif()
  add_library(trpo_ext::trpo_ext ALIAS trpo_ext_cg)
  unset(_trpo_ext_root)
  unset(_trpo_ext_src)
  unset(_trpo_ext_sources)
endif()
set(trpo_ext_FOUND TRUE)
