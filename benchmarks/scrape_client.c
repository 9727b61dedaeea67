/* A small HTTP/1.1 scrape client for benchmarks/bench_scale.py: C, so that the client costs far less
 * than either server it measures (a Python client would dominate the measurement on a 2-core box).
 *
 *   scrape_client MODE HOST PORT HEADFILE COUNT [PACE_US|CONCURRENCY]
 *
 * HEADFILE holds the whole request head (request line and headers, CRLF-terminated, blank line at the
 * end). MODE:
 *   new   COUNT sequential requests, each on a new connection (connect to last body byte is timed)
 *   keep  COUNT sequential requests on one kept-alive connection, one every PACE_US microseconds
 *         (0: back to back); a connection the server closes is reopened and that request timed whole
 *   conc  COUNT requests from CONCURRENCY connections at once, each request on a new connection
 *   tls   as keep, over TLS (built with -DWITH_TLS -lssl -lcrypto; the certificate is not verified)
 * Prints one latency in microseconds per request, then "# elapsed_us E errors N". A response counts
 * as an error unless its status is 200 and its whole Content-Length body arrived.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifdef WITH_TLS
#include <openssl/ssl.h>
static SSL_CTX *tls_ctx;
#endif

static struct sockaddr_in addr;
static char head[8192];
static size_t head_len;

static long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* Response parser state: headers are collected up to the blank line, then the body is counted. */
struct resp {
    char buf[16384];
    size_t len;
    long long body_left; /* -1 while the head is incomplete */
    int status;
};

static void resp_reset(struct resp *r) { r->len = 0; r->body_left = -1; r->status = 0; }

/* Feed bytes; returns 1 when the response is complete, 0 if more is needed, -1 on a malformed head. */
static int resp_feed(struct resp *r, const char *data, size_t n) {
    if (r->body_left >= 0) {
        r->body_left -= (long long)n;
        return r->body_left <= 0;
    }
    size_t room = sizeof(r->buf) - 1 - r->len;
    size_t take = n < room ? n : room;
    memcpy(r->buf + r->len, data, take);
    r->len += take;
    r->buf[r->len] = 0;
    char *end = strstr(r->buf, "\r\n\r\n");
    if (!end) return take < n ? -1 : 0;
    size_t head_bytes = (size_t)(end + 4 - r->buf);
    if (sscanf(r->buf, "HTTP/1.%*d %d", &r->status) != 1) return -1;
    long long length = -1;
    for (char *line = strstr(r->buf, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "content-length:", 15) == 0) length = atoll(line + 17);
    }
    if (length < 0) return -1;
    long long already = (long long)(r->len - head_bytes) + (long long)(n - take);
    r->body_left = length - already;
    return r->body_left <= 0;
}

static int open_conn(int nonblock) {
    int fd = socket(AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A blocking connection, plain or TLS. */
struct conn { int fd; void *tls; };

static int conn_open(struct conn *c, int tls) {
    c->tls = NULL;
    c->fd = open_conn(0);
    if (c->fd < 0) return -1;
#ifdef WITH_TLS
    if (tls) {
        SSL *s = SSL_new(tls_ctx);
        SSL_set_fd(s, c->fd);
        c->tls = s;
        if (SSL_connect(s) != 1) return -1;
    }
#else
    if (tls) { fprintf(stderr, "scrape_client: built without TLS\n"); exit(2); }
#endif
    return 0;
}

static void conn_close(struct conn *c) {
#ifdef WITH_TLS
    if (c->tls) SSL_free((SSL *)c->tls);
#endif
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->tls = NULL;
}

static ssize_t conn_write(struct conn *c, const char *p, size_t n) {
#ifdef WITH_TLS
    if (c->tls) return SSL_write((SSL *)c->tls, p, (int)n);
#endif
    return write(c->fd, p, n);
}

static ssize_t conn_read(struct conn *c, char *p, size_t n) {
#ifdef WITH_TLS
    if (c->tls) return SSL_read((SSL *)c->tls, p, (int)n);
#endif
    return read(c->fd, p, n);
}

/* One blocking request; 1 = complete 200, 0 = error, -1 = the connection was closed before any byte. */
static int request(struct conn *c, struct resp *r) {
    static char chunk[65536];
    resp_reset(r);
    if (conn_write(c, head, head_len) != (ssize_t)head_len) return -1;
    size_t got = 0;
    for (;;) {
        ssize_t n = conn_read(c, chunk, sizeof chunk);
        if (n <= 0) return got ? 0 : -1;
        got += (size_t)n;
        int done = resp_feed(r, chunk, (size_t)n);
        if (done < 0) return 0;
        if (done) return r->status == 200;
    }
}

static void sleep_until(long long t) {
    long long d = t - now_us();
    if (d > 0) {
        struct timespec ts = {d / 1000000, (d % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
}

static int run_sequential(int keep, int tls, int count, long long pace) {
    struct resp r;
    struct conn c = {-1, NULL};
    int errors = 0;
    long long start = now_us(), next = start;
    for (int i = 0; i < count; i++) {
        if (pace) { sleep_until(next); next += pace; }
        long long t0 = now_us();
        int ok = 0;
        for (int attempt = 0; attempt < 2 && ok <= 0; attempt++) {
            if (c.fd < 0 && conn_open(&c, tls) < 0) conn_close(&c);
            ok = c.fd < 0 ? 0 : request(&c, &r);
            if (ok <= 0 || !keep) conn_close(&c);
            if (ok == 0) break; /* a real error: do not retry */
        }
        long long t1 = now_us();
        if (ok != 1) errors++;
        printf("%lld\n", t1 - t0);
    }
    conn_close(&c);
    printf("# elapsed_us %lld errors %d\n", now_us() - start, errors);
    return 0;
}

struct slot { int fd; size_t sent; long long t0; struct resp r; };

static int run_concurrent(int count, int conc) {
    static char chunk[65536];
    int ep = epoll_create1(0), started = 0, done = 0, errors = 0;
    struct slot *slots = calloc((size_t)conc, sizeof *slots);
    long long *lat = calloc((size_t)count, sizeof *lat);
    long long start = now_us();
    struct epoll_event ev, events[256];
    for (int i = 0; i < conc; i++) slots[i].fd = -1;
    for (;;) {
        for (int i = 0; i < conc && started < count; i++) {
            if (slots[i].fd >= 0) continue;
            struct slot *s = &slots[i];
            s->t0 = now_us();
            s->sent = 0;
            resp_reset(&s->r);
            s->fd = open_conn(1);
            started++;
            if (s->fd < 0) { errors++; lat[done++] = now_us() - s->t0; continue; }
            ev.events = EPOLLOUT | EPOLLIN;
            ev.data.u32 = (unsigned)i;
            epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
        }
        if (done >= count) break;
        int n = epoll_wait(ep, events, 256, 10000);
        if (n <= 0) { fprintf(stderr, "scrape_client: no progress for 10 s\n"); break; }
        for (int k = 0; k < n; k++) {
            struct slot *s = &slots[events[k].data.u32];
            int finished = 0, ok = 0;
            if (s->sent < head_len && (events[k].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
                ssize_t w = write(s->fd, head + s->sent, head_len - s->sent);
                if (w < 0 && errno != EAGAIN) finished = 1;
                else if (w > 0 && (s->sent += (size_t)w) == head_len) {
                    ev.events = EPOLLIN;
                    ev.data.u32 = events[k].data.u32;
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                }
            }
            while (!finished && s->sent == head_len) {
                ssize_t m = read(s->fd, chunk, sizeof chunk);
                if (m < 0 && errno == EAGAIN) break;
                if (m <= 0) { finished = 1; break; }
                int st = resp_feed(&s->r, chunk, (size_t)m);
                if (st != 0) { finished = 1; ok = st > 0 && s->r.status == 200; }
            }
            if (finished) {
                lat[done++] = now_us() - s->t0;
                if (!ok && errors++ < 3)
                    fprintf(stderr, "scrape_client: error (status %d, %lld body bytes missing, errno %d)\n",
                            s->r.status, s->r.body_left, errno);
                close(s->fd);
                s->fd = -1;
            }
        }
    }
    long long elapsed = now_us() - start;
    for (int i = 0; i < done; i++) printf("%lld\n", lat[i]);
    printf("# elapsed_us %lld errors %d\n", elapsed, errors + (count - done));
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s new|keep|conc HOST PORT HEADFILE COUNT [PACE_US|CONCURRENCY]\n", argv[0]);
        return 2;
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 2; }
    FILE *f = fopen(argv[4], "rb");
    if (!f) { perror(argv[4]); return 2; }
    head_len = fread(head, 1, sizeof head, f);
    fclose(f);
    int count = atoi(argv[5]);
    long long extra = argc > 6 ? atoll(argv[6]) : 0;
#ifdef WITH_TLS
    tls_ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
#endif
    if (strcmp(argv[1], "new") == 0) return run_sequential(0, 0, count, extra);
    if (strcmp(argv[1], "keep") == 0) return run_sequential(1, 0, count, extra);
    if (strcmp(argv[1], "tls") == 0) return run_sequential(1, 1, count, extra);
    if (strcmp(argv[1], "conc") == 0) return run_concurrent(count, extra > 0 ? (int)extra : 50);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
