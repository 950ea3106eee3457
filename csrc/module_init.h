// Defines PyInit_<IMBREG_EXT_NAME> so that each shared library can be loaded with a plain
// `import imbreg_fast.<name>`; the operators are registered by static initialisers on load.
// Every library carries the identity of its build as module attributes SOURCE_ID (hash of csrc/, see
// imbreg_fast/_build_id.py) and TORCH_VERSION (the torch it was compiled against), from the header that
// setup.py generates. Only the module.cpp files include this header, so a new id recompiles just them.
#pragma once
#include <Python.h>

#include "imbreg_build_id.h"

#define IMBREG_CONCAT_(a, b) a##b
#define IMBREG_CONCAT(a, b) IMBREG_CONCAT_(a, b)
#define IMBREG_STR_(a) #a
#define IMBREG_STR(a) IMBREG_STR_(a)

#define IMBREG_DEFINE_MODULE()                                                                \
  PyMODINIT_FUNC IMBREG_CONCAT(PyInit_, IMBREG_EXT_NAME)(void) {                              \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,                            \
                                            IMBREG_STR(IMBREG_EXT_NAME), nullptr, -1,         \
                                            nullptr};                                         \
    PyObject* module = PyModule_Create(&module_def);                                          \
    if (module == nullptr) return nullptr;                                                    \
    if (PyModule_AddStringConstant(module, "SOURCE_ID", IMBREG_SOURCE_ID) < 0 ||              \
        PyModule_AddStringConstant(module, "TORCH_VERSION", IMBREG_TORCH_VERSION) < 0) {      \
      Py_DECREF(module);                                                                      \
      return nullptr;                                                                         \
    }                                                                                         \
    return module;                                                                            \
  }
