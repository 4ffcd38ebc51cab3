/* The load generator's viewers, in C: many WebSocket clients on one epoll loop.
 *
 * Same job and control protocol as `python -m bench.loadgen viewers` (bench/loadgen.py), at a
 * fraction of the CPU per frame, so that the load generator is never what a scenario measures
 * (docs/performance.md). It counts events (occurrences of "offset": in a frame), takes latency
 * from the `t0` (wall-clock ns) of the first event in each frame, answers pings and counts
 * closes.
 *
 *   viewers --count N --url ws://HOST:PORT/PATH?QUERY [--url ...]
 *
 * Prints {"ready": true, "connect_rate": R} once every viewer is connected, then reads commands
 * on stdin, one per line: "reset" (zero the counters; prints {"reset": true}), "report" (prints
 * the counters as JSON), "quit" or end of input (exits).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_START 16384
#define PARALLEL_CONNECTS 200
/* Seconds the connect phase may take in all; viewers not open by then count as failed. */
#define CONNECT_DEADLINE_S 60.0

enum state { CONNECTING, HANDSHAKE, OPEN, CLOSED };

struct conn {
    int fd;
    enum state state;
    int url;
    unsigned char *buf;
    size_t len, cap;
};

struct url {
    char host[256];
    char port[16];
    char path[4096];
};

static struct url *urls; /* one per --url, at most argc */
static int n_urls;
static struct conn *conns;
static int n_conns;
static int epfd;

static uint64_t events, frames, closed;
static int64_t *latencies;
static size_t n_lat, cap_lat;
static double cpu0;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int64_t wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void parse_url(const char *text, struct url *u) {
    if (strncmp(text, "ws://", 5) != 0) {
        fprintf(stderr, "only ws:// URLs: %s\n", text);
        exit(2);
    }
    const char *hostport = text + 5;
    const char *slash = strchr(hostport, '/');
    size_t hp_len = slash ? (size_t)(slash - hostport) : strlen(hostport);
    const char *colon = memchr(hostport, ':', hp_len);
    if (!colon || hp_len >= sizeof(u->host)) {
        fprintf(stderr, "URL needs host:port: %s\n", text);
        exit(2);
    }
    snprintf(u->host, sizeof(u->host), "%.*s", (int)(colon - hostport), hostport);
    snprintf(u->port, sizeof(u->port), "%.*s", (int)(hp_len - (colon - hostport) - 1), colon + 1);
    snprintf(u->path, sizeof(u->path), "%s", slash ? slash : "/");
}

static void watch(struct conn *c, uint32_t what, int op) {
    struct epoll_event ev = {.events = what, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void start_connect(struct conn *c) {
    struct url *u = &urls[c->url];
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(u->host, u->port, &hints, &ai) != 0) die("getaddrinfo");
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) die("connect");
    freeaddrinfo(ai);
    c->state = CONNECTING;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static void send_all(struct conn *c, const void *data, size_t len) {
    /* Handshakes and pongs are tiny: the socket buffer always has room. */
    const char *p = data;
    while (len) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

static void send_handshake(struct conn *c) {
    struct url *u = &urls[c->url];
    char req[8192];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     u->path, u->host, u->port);
    send_all(c, req, (size_t)n);
    c->state = HANDSHAKE;
    watch(c, EPOLLIN, EPOLL_CTL_MOD);
}

static void close_conn(struct conn *c) {
    if (c->state == CLOSED) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
    closed++;
}

static void record_latency(int64_t us) {
    if (n_lat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 1 << 20;
        latencies = realloc(latencies, cap_lat * sizeof(*latencies));
        if (!latencies) die("realloc");
    }
    latencies[n_lat++] = us;
}

static void on_data(const unsigned char *p, size_t len) {
    static const char OFFSET[] = "\"offset\":", T0[] = "\"t0\":";
    frames++;
    const unsigned char *end = p + len, *at = p;
    while ((at = memmem(at, (size_t)(end - at), OFFSET, sizeof(OFFSET) - 1))) {
        events++;
        at += sizeof(OFFSET) - 1;
    }
    const unsigned char *t0 = memmem(p, len, T0, sizeof(T0) - 1);
    if (!t0) return;
    t0 += sizeof(T0) - 1;
    int64_t value = 0;
    int digits = 0;
    while (t0 < end && *t0 >= '0' && *t0 <= '9' && digits < 19) {
        value = value * 10 + (*t0++ - '0');
        digits++;
    }
    if (digits) record_latency((wall_ns() - value) / 1000);
}

static void send_pong(struct conn *c, const unsigned char *payload, size_t len) {
    unsigned char frame[2 + 4 + 125];
    if (len > 125) return;
    frame[0] = 0x8A;               /* FIN + pong */
    frame[1] = 0x80 | (unsigned char)len; /* masked, as a client must */
    memset(frame + 2, 0, 4);       /* a zero mask leaves the payload as it is */
    memcpy(frame + 6, payload, len);
    send_all(c, frame, 6 + len);
}

/* Parse every complete frame in the buffer; keep what is left for the next read. */
static void parse_frames(struct conn *c) {
    size_t pos = 0;
    while (c->len - pos >= 2) {
        unsigned char *f = c->buf + pos;
        int opcode = f[0] & 0x0F, masked = f[1] & 0x80;
        uint64_t plen = f[1] & 0x7F;
        size_t head = 2;
        if (plen == 126) {
            if (c->len - pos < 4) break;
            plen = ((uint64_t)f[2] << 8) | f[3];
            head = 4;
        } else if (plen == 127) {
            if (c->len - pos < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | f[2 + i];
            head = 10;
        }
        if (masked) head += 4;
        if (c->len - pos < head || plen > c->len - pos - head) break; /* not all here yet */
        unsigned char *payload = f + head;
        if (masked) {
            for (uint64_t i = 0; i < plen; i++) payload[i] ^= f[head - 4 + (i & 3)];
        }
        if (opcode == 1 || opcode == 2) {
            on_data(payload, plen);
        } else if (opcode == 9) {
            send_pong(c, payload, plen);
        } else if (opcode == 8) {
            close_conn(c);
            return;
        }
        pos += head + plen;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
}

static int on_bytes(struct conn *c);

/* Returns 1 when the connection became open (handshake answered). */
static int on_readable(struct conn *c) {
    int gone = 0;
    for (;;) {
        if (c->cap - c->len < 4096) {
            c->cap *= 2;
            c->buf = realloc(c->buf, c->cap);
            if (!c->buf) die("realloc");
        }
        size_t room = c->cap - c->len;
        ssize_t n = recv(c->fd, c->buf + c->len, room, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (n <= 0) { /* closed or failed: what was read before still counts */
            gone = 1;
            break;
        }
        c->len += (size_t)n;
        if ((size_t)n < room) break; /* drained the socket: no second recv */
    }
    int opened = gone ? 0 : on_bytes(c);
    if (gone && c->state == OPEN) parse_frames(c);
    if (gone) close_conn(c);
    return opened;
}

/* The bytes read so far: the handshake's answer, then frames. Returns 1 when the connection
 * became open. */
static int on_bytes(struct conn *c) {
    if (c->state == HANDSHAKE) {
        unsigned char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!end) return 0;
        if (c->len < 12 || memcmp(c->buf + 9, "101", 3) != 0) {
            fprintf(stderr, "handshake refused: %.*s\n", (int)(c->len < 200 ? c->len : 200),
                    c->buf);
            close_conn(c);
            return 0;
        }
        size_t used = (size_t)(end - c->buf) + 4;
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
        c->state = OPEN;
        parse_frames(c);
        return c->state == OPEN;
    }
    parse_frames(c);
    return 0;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void report(void) {
    double cpu = cpu_seconds() - cpu0;
    char p50[32] = "NaN", p99[32] = "NaN", max[32] = "NaN";
    if (n_lat) {
        int64_t *sorted = malloc(n_lat * sizeof(*sorted));
        if (!sorted) die("malloc");
        memcpy(sorted, latencies, n_lat * sizeof(*sorted));
        qsort(sorted, n_lat, sizeof(*sorted), cmp_i64);
        size_t i50 = (size_t)(0.50 * n_lat), i99 = (size_t)(0.99 * n_lat);
        if (i50 >= n_lat) i50 = n_lat - 1;
        if (i99 >= n_lat) i99 = n_lat - 1;
        snprintf(p50, sizeof(p50), "%.3f", sorted[i50] / 1000.0);
        snprintf(p99, sizeof(p99), "%.3f", sorted[i99] / 1000.0);
        snprintf(max, sizeof(max), "%.3f", sorted[n_lat - 1] / 1000.0);
        free(sorted);
    }
    printf("{\"events\": %llu, \"frames\": %llu, \"closed\": %llu, \"p50_ms\": %s, "
           "\"p99_ms\": %s, \"max_ms\": %s, \"cpu_s\": %.6f}\n",
           (unsigned long long)events, (unsigned long long)frames, (unsigned long long)closed,
           p50, p99, max, cpu);
    fflush(stdout);
}

/* Returns 0 when told to quit. */
static int on_command(void) {
    static char line[256];
    static size_t have;
    ssize_t n = read(STDIN_FILENO, line + have, sizeof(line) - 1 - have);
    if (n <= 0) return 0;
    have += (size_t)n;
    char *nl;
    while ((nl = memchr(line, '\n', have))) {
        *nl = 0;
        for (char *end = nl; end > line && (end[-1] == '\r' || end[-1] == ' ');) *--end = 0;
        if (line[0] == 0) {
            /* an empty line: nothing to do */
        } else if (strcmp(line, "reset") == 0) {
            events = frames = closed = 0;
            n_lat = 0;
            cpu0 = cpu_seconds();
            printf("{\"reset\": true}\n");
            fflush(stdout);
        } else if (strcmp(line, "report") == 0) {
            report();
        } else {
            return 0; /* "quit" */
        }
        size_t used = (size_t)(nl - line) + 1;
        memmove(line, line + used, have - used);
        have -= used;
    }
    if (have == sizeof(line) - 1) have = 0; /* an absurd line: drop it */
    return 1;
}

int main(int argc, char **argv) {
    urls = calloc((size_t)argc, sizeof(*urls));
    if (!urls) die("calloc");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--count") == 0 && i + 1 < argc) {
            n_conns = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--url") == 0 && i + 1 < argc) {
            parse_url(argv[++i], &urls[n_urls++]);
        } else {
            fprintf(stderr, "usage: viewers --count N --url ws://HOST:PORT/PATH ...\n");
            return 2;
        }
    }
    if (n_conns <= 0 || n_urls == 0) {
        fprintf(stderr, "usage: viewers --count N --url ws://HOST:PORT/PATH ...\n");
        return 2;
    }
    struct rlimit nofile;
    getrlimit(RLIMIT_NOFILE, &nofile);
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);

    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    conns = calloc((size_t)n_conns, sizeof(*conns));
    if (!conns) die("calloc");
    for (int i = 0; i < n_conns; i++) {
        conns[i].url = i % n_urls;
        conns[i].cap = BUF_START;
        conns[i].buf = malloc(BUF_START);
        if (!conns[i].buf) die("malloc");
        conns[i].fd = -1;
        conns[i].state = CLOSED;
    }

    struct epoll_event *ready = calloc(1024, sizeof(*ready));
    double started = monotonic();
    int next = 0, in_flight = 0, open_count = 0, finished = 0;
    cpu0 = cpu_seconds();
    while (finished < n_conns) { /* connect phase: at most PARALLEL_CONNECTS at once */
        if (monotonic() - started > CONNECT_DEADLINE_S) {
            fprintf(stderr, "viewers: %d not open after %.0f s\n", n_conns - open_count,
                    CONNECT_DEADLINE_S);
            for (int i = 0; i < next; i++)
                if (conns[i].state != OPEN) close_conn(&conns[i]);
            break;
        }
        while (in_flight < PARALLEL_CONNECTS && next < n_conns) {
            start_connect(&conns[next++]);
            in_flight++;
        }
        int n = epoll_wait(epfd, ready, 1024, 1000);
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[ready[i].data.u32];
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof(err);
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    fprintf(stderr, "connect: %s\n", strerror(err));
                    close_conn(c);
                    in_flight--, finished++;
                    continue;
                }
                send_handshake(c);
            } else if (c->state == HANDSHAKE) {
                if (on_readable(c)) open_count++, in_flight--, finished++;
                else if (c->state == CLOSED) in_flight--, finished++;
            } else if (c->state == OPEN) {
                on_readable(c);
            }
        }
    }
    double rate = n_conns / (monotonic() - started);
    printf("{\"ready\": true, \"connect_rate\": %.3f, \"open\": %d}\n", rate, open_count);
    fflush(stdout);

    struct epoll_event in = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, STDIN_FILENO, &in) < 0) die("epoll_ctl stdin");
    for (;;) {
        int n = epoll_wait(epfd, ready, 1024, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (ready[i].data.u32 == UINT32_MAX) {
                if (!on_command()) return 0;
                continue;
            }
            struct conn *c = &conns[ready[i].data.u32];
            if (c->state == OPEN) on_readable(c);
        }
    }
}
