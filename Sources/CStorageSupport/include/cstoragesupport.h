#ifndef CSTORAGESUPPORT_H
#define CSTORAGESUPPORT_H
#include <stddef.h>
#include <stdint.h>

/// 1 when the CPU has the SSE 4.2 CRC32 instruction (checked once with cpuid).
int cairn_crc32c_hardware_available(void);

/// Extends the raw (not inverted) CRC-32C state `crc` over `n` bytes with the CRC32 instruction.
/// Only call when `cairn_crc32c_hardware_available()` returned 1.
uint32_t cairn_crc32c_hardware(uint32_t crc, const uint8_t *bytes, size_t n);

/// Returns freed heap pages to the OS (glibc's malloc_trim(0)); a no-op elsewhere.
void cairn_release_free_memory(void);

/// Names the calling thread (at most 15 bytes are kept on Linux); a no-op elsewhere.
void cairn_set_thread_name(const char *name);

/// Sets the calling thread's timer slack to 1 ns, so its sleeps end on time instead of up to
/// 50 µs late (Linux's default slack); a no-op elsewhere.
void cairn_precise_timers(void);

/// Sets the calling thread's nice value (Linux: per thread; 0 = normal, 19 = lowest priority).
/// 0, or -1 with errno set; a no-op returning 0 elsewhere.
int cairn_set_thread_nice(int nice);

/// Writes the file's dirty pages in [offset, offset + count) to the device and waits for them
/// (Linux's sync_file_range with WAIT_BEFORE | WRITE | WAIT_AFTER). Not a durability barrier: no
/// metadata, no device cache flush. 0, or -1 with errno set; a no-op returning 0 elsewhere.
int cairn_write_out(int fd, int64_t offset, int64_t count);

/// Starts `path` with `argv` and `envp` (NULL-terminated), its standard input, output and error
/// on `in_fd`, `out_fd`, `err_fd` (-1: the caller's own), every other descriptor closed (glibc
/// 2.34 and later), the signal mask empty and every signal at its default. Unlike Foundation's
/// `Process`, it never lists /proc/self/fd (swift-corelibs-foundation reads past a dirent there,
/// an intermittent crash in processes with many descriptors). 0 with `*pid_out` set, else an errno.
int cairn_spawn(const char *path, char *const argv[], char *const envp[], int in_fd, int out_fd, int err_fd, int *pid_out);

#endif
