/*
 * handshake: full mTLS handshakes per second against a TLS server, no resumption.
 *
 *   handshake HOST PORT WORKERS SECONDS CERT KEY CA SNI ALPN
 *
 * WORKERS connections are kept in flight by one epoll loop (non-blocking sockets). Each one:
 * TCP connect, a TLS 1.3 handshake with a fresh SSL object (client certificate CERT/KEY,
 * the server's chain verified against CA; no session is ever offered, so every handshake is
 * full), then close_notify, then it reads until the server closes. Waiting for the server's
 * close matters: in TLS 1.3 the client finishes first, and only after reading the client's
 * Finished (and checking its certificate) does the server see the close_notify, so a counted
 * handshake is one the server completed and accepted. A server alert (e.g. a refused client
 * certificate) counts as an error.
 *
 * Output, one line: handshakes=N errors=E rate=R (handshakes per second).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, HANDSHAKING, CLOSING };

typedef struct {
    int fd;
    int state;
    SSL *ssl;
} slot_t;

static SSL_CTX *ctx;
static struct sockaddr_in addr;
static const char *sni;
static int ep;
static long done_count, errors;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void start(slot_t *s, uint32_t index) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->ssl = NULL;
    s->state = CONNECTING;
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) != 0 && errno != EINPROGRESS) {
        perror("connect");
        exit(2);
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = index};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

static void finish(slot_t *s, uint32_t index, int ok) {
    if (ok)
        done_count++;
    else
        errors++;
    if (s->ssl != NULL) SSL_free(s->ssl);
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    start(s, index);
}

static void want(slot_t *s, uint32_t index, int err) {
    struct epoll_event ev = {.events = err == SSL_ERROR_WANT_WRITE ? EPOLLOUT : EPOLLIN,
                             .data.u32 = index};
    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
}

static void step(slot_t *s, uint32_t index) {
    if (s->state == CONNECTING) {
        int soerr = 0;
        socklen_t len = sizeof soerr;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
        if (soerr != 0) {
            finish(s, index, 0);
            return;
        }
        s->ssl = SSL_new(ctx);
        SSL_set_fd(s->ssl, s->fd);
        SSL_set_tlsext_host_name(s->ssl, sni);
        s->state = HANDSHAKING;
    }
    if (s->state == HANDSHAKING) {
        int r = SSL_connect(s->ssl);
        if (r != 1) {
            int err = SSL_get_error(s->ssl, r);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
                want(s, index, err);
                return;
            }
            ERR_clear_error();
            finish(s, index, 0);
            return;
        }
        SSL_shutdown(s->ssl);
        s->state = CLOSING;
    }
    /* CLOSING: read (session tickets, alerts) until the server closes. */
    char buf[4096];
    for (;;) {
        int r = SSL_read(s->ssl, buf, sizeof buf);
        if (r > 0) continue;
        int err = SSL_get_error(s->ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            want(s, index, err);
            return;
        }
        /* ZERO_RETURN (close_notify) or SYSCALL (EOF/reset after our close_notify): done. */
        ERR_clear_error();
        finish(s, index, err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL);
        return;
    }
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: handshake HOST PORT WORKERS SECONDS CERT KEY CA SNI ALPN\n");
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    int workers = atoi(argv[3]);
    double seconds = atof(argv[4]);
    sni = argv[8];
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[5]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[6], SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_load_verify_locations(ctx, argv[7], NULL) != 1) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    unsigned char alpn[256];
    size_t alpn_len = strlen(argv[9]);
    alpn[0] = (unsigned char)alpn_len;
    memcpy(alpn + 1, argv[9], alpn_len);
    SSL_CTX_set_alpn_protos(ctx, alpn, (unsigned)alpn_len + 1);

    ep = epoll_create1(0);
    slot_t *slots = calloc((size_t)workers, sizeof *slots);
    for (int i = 0; i < workers; i++) start(&slots[i], (uint32_t)i);
    double begin = now_s(), end = begin + seconds;
    struct epoll_event events[256];
    while (now_s() < end) {
        int k = epoll_wait(ep, events, 256, 100);
        for (int e = 0; e < k; e++) {
            uint32_t i = events[e].data.u32;
            step(&slots[i], i);
        }
    }
    double elapsed = now_s() - begin;
    printf("handshakes=%ld errors=%ld rate=%.1f\n", done_count, errors, done_count / elapsed);
    return done_count > 0 ? 0 : 1;
}
