#ifndef CAIRN_CSYSTEMD_SHIM_H
#define CAIRN_CSYSTEMD_SHIM_H
#include <systemd/sd-daemon.h>
#endif
