/* The ingest load generator: keep-alive HTTP/1.1 connections each sending one POST at a time,
 * back to back, for a fixed time, with no Python and no event loop library on the sending side.
 *
 *   poster --port P --path /api/event --body-file F [--connections 64] [--duration 8]
 *
 * Every occurrence of MARKER_ID in the body is replaced, in each request, by a fresh random
 * version-4 UUID: events carry their own ids, as the tracking script sends them, each new.
 *
 * Why C: the Python poster (bench/loadgen.py) spends ~29 us of CPU per request, this one ~10
 * (mostly the kernel's loopback), measured against the same server. The poster shares its core
 * with PostgreSQL and Redis, so at 10,000 requests/s the Python one took a fifth of that core
 * more from them (docs/performance.md). Responses must be framed by Content-Length (both servers
 * under test do). Prints one JSON line like bench.loadgen's:
 * requests_ok (202s), requests, seconds, p50_ms, p99_ms, cpu_s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 1024
#define BUF_BYTES 65536
#define MAX_LATENCIES 20000000

/* bench/loadgen.py MARKER_ID: the same marker. */
#define MARKER_ID "00000000-0000-4000-8000-000000000000"
#define MAX_MARKERS 1000

typedef struct {
    int fd;
    char *request;    /* this connection's copy: its ids change between requests */
    size_t sent;      /* bytes of the current request written */
    size_t have;      /* bytes of the current response read */
    long long start;  /* ns when the current request began */
    char buf[BUF_BYTES];
} conn_t;

static char *request;
static size_t request_len;
static size_t markers[MAX_MARKERS]; /* offsets of MARKER_ID in the request */
static int marker_count;
static unsigned long long rng = 0x9e3779b97f4a7c15ULL;
static unsigned *latencies_us;
static long requests, requests_ok;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static unsigned long long next_random(void) { /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545f4914f6cdd1dULL;
}

/* A fresh version-4 UUID over each marker of c's request. */
static void fresh_ids(conn_t *c) {
    static const char hex[] = "0123456789abcdef";
    for (int m = 0; m < marker_count; m++) {
        char *id = c->request + markers[m];
        unsigned long long bits[2] = {next_random(), next_random()};
        int k = 0;
        for (int i = 0; i < 36; i++) {
            if (i == 8 || i == 13 || i == 18 || i == 23) continue; /* the dashes stay */
            if (i == 14 || i == 19) continue;                       /* version, variant stay */
            id[i] = hex[(bits[k / 16] >> (4 * (k % 16))) & 15];
            k++;
        }
    }
}

/* Write what is left of the current request; 0 when all of it is out. */
static int send_rest(conn_t *c) {
    while (c->sent < request_len) {
        ssize_t n = write(c->fd, c->request + c->sent, request_len - c->sent);
        if (n < 0) {
            if (errno == EAGAIN) return 1;
            die("write"); /* EPIPE, ECONNRESET: the server dropped the connection */
        }
        c->sent += (size_t)n;
    }
    return 0;
}

static void begin(conn_t *c) {
    fresh_ids(c);
    c->sent = 0;
    c->have = 0;
    c->start = now_ns();
    send_rest(c);
}

/* Length of a complete response at the start of c->buf, or 0 if it is not all here yet. */
static size_t complete(conn_t *c) {
    char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    size_t head = (size_t)(end - c->buf) + 4;
    size_t body = 0;
    for (char *p = c->buf; p < end; p++) {
        if ((p == c->buf || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
            body = strtoul(p + 15, NULL, 10);
            break;
        }
    }
    return c->have >= head + body ? head + body : 0;
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
        die("connect");
    return fd;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die(path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc((size_t)size + 1);
    if (fread(data, 1, (size_t)size, f) != (size_t)size) die("read body");
    fclose(f);
    *len = (size_t)size;
    return data;
}

static int cmp_unsigned(const void *a, const void *b) {
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return (x > y) - (x < y);
}

static double percentile_ms(double q) {
    if (requests == 0) return 0.0;
    long i = (long)(q * (double)(requests - 1));
    return latencies_us[i] / 1000.0;
}

int main(int argc, char **argv) {
    int port = 0, conns = 64;
    double duration = 8.0;
    const char *path = "/api/event", *body_file = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--path")) path = argv[i + 1];
        else if (!strcmp(argv[i], "--body-file")) body_file = argv[i + 1];
        else if (!strcmp(argv[i], "--connections")) conns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else {
            fprintf(stderr, "poster: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (port == 0 || body_file == NULL || conns < 1 || conns > MAX_CONNS) {
        fprintf(stderr, "usage: poster --port P --body-file F [--path P] [--connections N<=%d]"
                        " [--duration S]\n", MAX_CONNS);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a reset connection is reported below, not a silent death */
    size_t body_len;
    char *body = read_file(body_file, &body_len);
    request = malloc(body_len + strlen(path) + 512);
    request_len = (size_t)sprintf(request,
                                  "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                                  "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0\r\n"
                                  "Content-Length: %zu\r\n\r\n",
                                  path, body_len);
    memcpy(request + request_len, body, body_len);
    request_len += body_len;
    latencies_us = malloc(sizeof(unsigned) * MAX_LATENCIES);
    for (char *at = request; marker_count < MAX_MARKERS;) {
        at = memmem(at, request_len - (size_t)(at - request), MARKER_ID, 36);
        if (at == NULL) break;
        markers[marker_count++] = (size_t)(at - request);
        at += 36;
    }
    rng ^= (unsigned long long)now_ns() ^ ((unsigned long long)getpid() << 32);

    int ep = epoll_create1(0);
    conn_t *all = calloc((size_t)conns, sizeof(conn_t));
    for (int i = 0; i < conns; i++) {
        all[i].request = malloc(request_len);
        memcpy(all[i].request, request, request_len);
        all[i].fd = connect_to(port);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = &all[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, all[i].fd, &ev) < 0) die("epoll_ctl");
    }
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    long long started = now_ns(), deadline = started + (long long)(duration * 1e9);
    long long give_up = deadline + 30000000000LL; /* a response 30 s late: the server hung */
    for (int i = 0; i < conns; i++) begin(&all[i]);
    int open = conns;
    struct epoll_event events[256];
    while (open > 0) {
        int n = epoll_wait(ep, events, 256, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        if (now_ns() > give_up) {
            fprintf(stderr, "poster: %d responses still missing 30 s after the end\n", open);
            return 1;
        }
        for (int k = 0; k < n; k++) {
            conn_t *c = events[k].data.ptr;
            if (c->fd < 0) continue;
            if (events[k].events & EPOLLOUT) send_rest(c);
            for (;;) {
                ssize_t got = read(c->fd, c->buf + c->have, BUF_BYTES - c->have);
                if (got < 0 && errno == EAGAIN) break;
                if (got <= 0) {
                    fprintf(stderr, "poster: the server closed a connection\n");
                    return 1;
                }
                c->have += (size_t)got;
                size_t len = complete(c);
                if (len == 0) {
                    if (c->have == BUF_BYTES) {
                        fprintf(stderr, "poster: response over %d bytes\n", BUF_BYTES);
                        return 1;
                    }
                    continue;
                }
                long long t = now_ns();
                if (requests < MAX_LATENCIES) latencies_us[requests] = (unsigned)((t - c->start) / 1000);
                requests++;
                if (c->have > 12 && !strncmp(c->buf + 8, " 202 ", 5)) requests_ok++;
                if (t >= deadline) {
                    close(c->fd);
                    c->fd = -1;
                    open--;
                    break;
                }
                begin(c);
            }
        }
    }
    double seconds = (double)(now_ns() - started) / 1e9;
    getrusage(RUSAGE_SELF, &r1);
    double cpu = (double)(r1.ru_utime.tv_sec - r0.ru_utime.tv_sec + r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) +
                 (double)(r1.ru_utime.tv_usec - r0.ru_utime.tv_usec + r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) / 1e6;
    long recorded = requests < MAX_LATENCIES ? requests : MAX_LATENCIES;
    qsort(latencies_us, (size_t)recorded, sizeof(unsigned), cmp_unsigned);
    long saved = requests;
    requests = recorded;
    double p50 = percentile_ms(0.5), p99 = percentile_ms(0.99);
    requests = saved;
    printf("{\"requests_ok\": %ld, \"requests\": %ld, \"seconds\": %.3f, \"p50_ms\": %.3f, "
           "\"p99_ms\": %.3f, \"cpu_s\": %.3f}\n",
           requests_ok, requests, seconds, p50, p99, cpu);
    return 0;
}
