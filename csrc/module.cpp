#include "module_init.h"
IMBREG_DEFINE_MODULE()
