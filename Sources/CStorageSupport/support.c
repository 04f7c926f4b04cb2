// C helpers for CairnStorage. CRC-32C with the SSE 4.2 CRC32 instruction: 8 bytes per instruction. The Swift side keeps a
// table-driven fallback for CPUs without it (CairnStorage/CRC32C.swift).
#define _GNU_SOURCE
#include "cstoragesupport.h"
#include <errno.h>
#include <string.h>

#if defined(__x86_64__)
int cairn_crc32c_hardware_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

__attribute__((target("sse4.2")))
uint32_t cairn_crc32c_hardware(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n > 0) {
        c32 = __builtin_ia32_crc32qi(c32, *p);
        p++;
        n--;
    }
    return c32;
}
#else
int cairn_crc32c_hardware_available(void) { return 0; }
uint32_t cairn_crc32c_hardware(uint32_t crc, const uint8_t *p, size_t n) { (void)p; (void)n; return crc; }
#endif

#if defined(__GLIBC__)
#include <malloc.h>
void cairn_release_free_memory(void) { malloc_trim(0); }
#else
void cairn_release_free_memory(void) {}
#endif

#if defined(__linux__)
#include <sys/prctl.h>
void cairn_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
void cairn_precise_timers(void) { prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); }
#else
void cairn_set_thread_name(const char *name) { (void)name; }
void cairn_precise_timers(void) {}
#endif

#if defined(__linux__)
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
int cairn_set_thread_nice(int nice) { return setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice); }
#else
int cairn_set_thread_nice(int nice) { (void)nice; return 0; }
#endif

#if defined(__linux__)
#include <fcntl.h>
int cairn_write_out(int fd, int64_t offset, int64_t count) {
    int r;
    do {
        r = sync_file_range(fd, offset, count,
                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    } while (r != 0 && errno == EINTR);
    return r;
}
#else
int cairn_write_out(int fd, int64_t offset, int64_t count) { (void)fd; (void)offset; (void)count; return 0; }
#endif

#include <spawn.h>
#include <signal.h>

int cairn_spawn(const char *path, char *const argv[], char *const envp[], int in_fd, int out_fd, int err_fd, int *pid_out) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    int r = posix_spawn_file_actions_init(&actions);
    if (r != 0) return r;
    r = posix_spawnattr_init(&attributes);
    if (r != 0) { posix_spawn_file_actions_destroy(&actions); return r; }
    int sources[3] = { in_fd, out_fd, err_fd };
    for (int i = 0; i < 3 && r == 0; i++) {
        // dup2 onto itself clears close-on-exec (glibc >= 2.29), so an inherited 0/1/2 stays open.
        if (sources[i] >= 0) r = posix_spawn_file_actions_adddup2(&actions, sources[i], i);
    }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
    if (r == 0) r = posix_spawn_file_actions_addclosefrom_np(&actions, 3);
#endif
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    if (r == 0) r = posix_spawnattr_setsigmask(&attributes, &none);
    if (r == 0) r = posix_spawnattr_setsigdefault(&attributes, &all);
    if (r == 0) r = posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid = 0;
    if (r == 0) r = posix_spawn(&pid, path, &actions, &attributes, argv, envp);
    if (r == 0) *pid_out = (int)pid;
    posix_spawnattr_destroy(&attributes);
    posix_spawn_file_actions_destroy(&actions);
    return r;
}
