/*
 * A frozen wall clock for redis-server in the fleet tests: preloaded (LD_PRELOAD), it answers
 * the wall-clock calls (clock_gettime for CLOCK_REALTIME, gettimeofday, time) with the moment
 * written in the file named by $FROZEN_TIME_FILE (microseconds since the Unix epoch, as
 * decimal text), which the test moves together with tokio's paused clock. Monotonic clocks
 * are left alone, so Redis's event loop runs in real time. Key expiry (PX, PXAT, PTTL) and
 * TIME then follow the test's clock.
 *
 * libfaketime does the same from a timestamp file, but it cannot run Debian's redis-server:
 * it and jemalloc each call the other while initialising, and the server hangs at start. This
 * file allocates nothing and reaches the kernel directly (open, read, syscall), so it needs no
 * initialisation at all.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* The frozen moment in microseconds, or -1 when there is none to read. */
static long long frozen_us(void) {
    const char *path = getenv("FROZEN_TIME_FILE");
    if (path == NULL) return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char text[32];
    ssize_t n = read(fd, text, sizeof text);
    close(fd);
    long long us = 0;
    ssize_t i = 0;
    for (; i < n && text[i] >= '0' && text[i] <= '9'; i++) us = us * 10 + (text[i] - '0');
    return i > 0 ? us : -1;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE) {
        long long us = frozen_us();
        if (us >= 0) {
            ts->tv_sec = us / 1000000;
            ts->tv_nsec = (us % 1000000) * 1000;
            return 0;
        }
    }
    return syscall(SYS_clock_gettime, id, ts);
}

int gettimeofday(struct timeval *tv, void *tz) {
    long long us = frozen_us();
    if (us < 0) return syscall(SYS_gettimeofday, tv, tz);
    tv->tv_sec = us / 1000000;
    tv->tv_usec = us % 1000000;
    return 0;
}

time_t time(time_t *out) {
    long long us = frozen_us();
    time_t now = us >= 0 ? (time_t)(us / 1000000) : (time_t)syscall(SYS_time, NULL);
    if (out != NULL) *out = now;
    return now;
}
