// Python entry point of nested_learning._C. The module itself is empty: importing it runs
// the static TORCH_LIBRARY registrations of the kernels in csrc/cpu (and csrc/cuda).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "nested_learning C++ kernels", -1, nullptr};
  return PyModule_Create(&module);
}
