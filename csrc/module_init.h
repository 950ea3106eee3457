// Defines PyInit_<IMBREG_EXT_NAME> so that each shared library can be loaded with a plain
// `import imbreg_fast.<name>`; the operators are registered by static initialisers on load.
#pragma once
#include <Python.h>

#define IMBREG_CONCAT_(a, b) a##b
#define IMBREG_CONCAT(a, b) IMBREG_CONCAT_(a, b)
#define IMBREG_STR_(a) #a
#define IMBREG_STR(a) IMBREG_STR_(a)

#define IMBREG_DEFINE_MODULE()                                                        \
  PyMODINIT_FUNC IMBREG_CONCAT(PyInit_, IMBREG_EXT_NAME)(void) {                      \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,                    \
                                            IMBREG_STR(IMBREG_EXT_NAME), nullptr, -1, \
                                            nullptr};                                 \
    return PyModule_Create(&module_def);                                              \
  }
