/*
 * openloop: an open-loop HTTP/1.1 load generator (no coordinated omission).
 *
 *   openloop HOST PORT CONNECTIONS RATE SECONDS WARMUP_SECONDS HOST_HEADER
 *
 * CONNECTIONS keep-alive connections share a fixed schedule of RATE requests per second:
 * connection i sends its k-th request at start + (i + k * CONNECTIONS) / RATE. A connection has
 * at most one request outstanding (like wrk2); when a response comes after the next send was
 * due, the next request goes at once but its latency still counts from its INTENDED send time,
 * so a stall shows up in the latency of every request it delayed. Requests sent during the
 * first WARMUP_SECONDS are not recorded. Timing: CLOCK_MONOTONIC; the schedule is kept by a
 * timerfd armed at the next due send (no busy polling: the proxies need the cores).
 *
 * Responses must carry Content-Length (no chunked bodies). The output is one line of
 * key=value pairs: sent, recorded, errors, late (sends that went out >1 ms after schedule),
 * rate (achieved: responses received per second after the warm-up, whenever they were due),
 * p50_us, p90_us, p99_us, p999_us, max_us (over the requests due after the warm-up).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    int busy;             /* a request is outstanding */
    int64_t due;          /* intended send time of the next request (ns) */
    int64_t intended;     /* intended send time of the outstanding request */
    char buf[65536];
    size_t len;
} conn_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int open_conn(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        exit(2);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Length of the first complete response in buf, 0 if incomplete, -1 if unusable. */
static long response_length(const char *buf, size_t len) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    size_t head = (size_t)(end - buf) + 4;
    long body = -1;
    for (const char *line = buf; line < end;) {
        const char *eol = memmem(line, (size_t)(end - line) + 2, "\r\n", 2);
        if (eol == NULL) break;
        if ((size_t)(eol - line) > 15 && strncasecmp(line, "content-length:", 15) == 0)
            body = strtol(line + 15, NULL, 10);
        line = eol + 2;
    }
    if (body < 0 || strncmp(buf, "HTTP/1.1 2", 10) != 0) return -1;
    return head + (size_t)body <= len ? (long)(head + (size_t)body) : 0;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: openloop HOST PORT CONNECTIONS RATE SECONDS WARMUP HOST_HEADER\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), n = atoi(argv[3]);
    double rate = atof(argv[4]), seconds = atof(argv[5]), warmup = atof(argv[6]);
    char request[512];
    int reqlen = snprintf(request, sizeof request, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", argv[7]);
    if (n < 1 || rate <= 0 || seconds <= 0) return 2;

    size_t cap = (size_t)(rate * seconds * 1.1) + 1024;
    int64_t *lat = malloc(cap * sizeof *lat);
    conn_t *conns = calloc((size_t)n, sizeof *conns);
    int ep = epoll_create1(0);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)n};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    for (int i = 0; i < n; i++) {
        conns[i].fd = open_conn(host, port);
        ev.events = EPOLLIN;
        ev.data.u32 = (uint32_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
    }
    int64_t interval = (int64_t)(1e9 * n / rate);
    int64_t start = now_ns() + 1000000;
    int64_t record_from = start + (int64_t)(warmup * 1e9);
    int64_t stop = start + (int64_t)((warmup + seconds) * 1e9);
    for (int i = 0; i < n; i++) conns[i].due = start + (int64_t)(1e9 * i / rate);
    long sent = 0, recorded = 0, errors = 0, late = 0, received = 0;

    for (;;) {
        int64_t t = now_ns();
        if (t >= stop) break;
        int64_t next = stop;
        for (int i = 0; i < n; i++) {
            conn_t *c = &conns[i];
            if (c->fd < 0 || c->busy) continue;
            if (c->due <= t) {
                if (write(c->fd, request, (size_t)reqlen) != reqlen) {
                    errors++;
                    close(c->fd);
                    c->fd = -1;
                    continue;
                }
                if (t - c->due > 1000000) late++;
                c->busy = 1;
                c->intended = c->due;
                c->due += interval;
                sent++;
            } else if (c->due < next) {
                next = c->due;
            }
        }
        struct itimerspec its = {.it_value = {.tv_sec = next / 1000000000LL,
                                              .tv_nsec = next % 1000000000LL}};
        timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        struct epoll_event events[256];
        int k = epoll_wait(ep, events, 256, 1000);
        for (int e = 0; e < k; e++) {
            uint32_t i = events[e].data.u32;
            if ((int)i == n) {
                uint64_t expirations;
                (void)!read(tfd, &expirations, sizeof expirations);
                continue;
            }
            conn_t *c = &conns[i];
            if (c->fd < 0) continue;
            ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                errors++;
                close(c->fd);
                c->fd = -1;
                continue;
            }
            c->len += (size_t)r;
            long used = response_length(c->buf, c->len);
            if (used < 0) {
                errors++;
                close(c->fd);
                c->fd = -1;
                continue;
            }
            if (used > 0) {
                int64_t done = now_ns();
                memmove(c->buf, c->buf + used, c->len - (size_t)used);
                c->len -= (size_t)used;
                c->busy = 0;
                if (done >= record_from) received++;
                if (c->intended >= record_from && recorded < (long)cap)
                    lat[recorded++] = done - c->intended;
            }
        }
    }
    for (int i = 0; i < n; i++) {
        if (conns[i].busy && conns[i].intended >= record_from && recorded < (long)cap) {
            /* Unanswered at the end: at least this late (keeps a stall visible). */
            lat[recorded++] = stop - conns[i].intended;
        }
        if (conns[i].fd >= 0) close(conns[i].fd);
    }
    if (recorded == 0) {
        printf("sent=%ld recorded=0 errors=%ld late=%ld\n", sent, errors, late);
        return 1;
    }
    qsort(lat, (size_t)recorded, sizeof *lat, cmp_i64);
#define PCT(p) (lat[(size_t)((double)(recorded - 1) * (p))] / 1000.0)
    printf("sent=%ld recorded=%ld errors=%ld late=%ld rate=%.1f p50_us=%.1f p90_us=%.1f "
           "p99_us=%.1f p999_us=%.1f max_us=%.1f\n",
           sent, recorded, errors, late, received / seconds, PCT(0.5), PCT(0.9), PCT(0.99),
           PCT(0.999), lat[recorded - 1] / 1000.0);
    return errors ? 1 : 0;
}
