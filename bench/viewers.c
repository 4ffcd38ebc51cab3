/* The load generator's viewers, in C: many WebSocket clients on one epoll loop.
 *
 * Same job and control protocol as `python -m bench.loadgen viewers` (bench/loadgen.py), at a
 * fraction of the CPU per frame, so that the load generator is never what a scenario measures
 * (docs/performance.md). It counts events (occurrences of "offset": in a frame), takes latency
 * from the `t0` (wall-clock ns) of the first event in each frame, answers pings and counts
 * closes. It also checks every viewer's stream: each event's offset must follow the last one
 * that viewer saw (a repeat counts in `dups`, a jump in `gaps`).
 *
 *   viewers --count N --url ws://HOST:PORT/PATH?QUERY [--url ...] [--urls FILE] [--sources S]
 *           [--reconnect] [--backoff-ms B] [--parallel P] [--deadline SECONDS]
 *
 * Viewer i uses URL i mod (number of URLs); `--urls` reads more, one a line. Options:
 *   --sources S   bind viewer i to the loopback source address 127.0.0.(2 + i mod S): one
 *                 address has ~28,000 ephemeral ports towards one server port
 *                 (net.ipv4.ip_local_port_range), so 100,000 viewers need several
 *                 (the whole of 127/8 is loopback on Linux). Loopback URLs only.
 *   --reconnect   on a close with a "reconnect" code (4000-4499, or 1012), or a connection
 *                 lost without a close, reconnect as docs/protocol.md asks: after B ms x 2^n
 *                 (n = failures in a row, capped at 30 s), +/-50 % jitter, resuming with
 *                 `since=` the last cursor this viewer saw. Without it a closed viewer stays
 *                 closed.
 *   --parallel P  connections opening at once in the connect phase (200); reconnects after a
 *                 close, and "back", are not held back: that is the storm to measure.
 *   --deadline S  seconds the connect phase may take (60); viewers not open by then failed.
 *   --open-timeout S  seconds one attempt may take to reach its 101 (10): then it failed (and
 *                 is retried with --reconnect), as a real client's open timeout.
 *
 * Raises its own RLIMIT_NOFILE to what --count needs (to the hard limit, and beyond it when
 * running as root, up to fs.nr_open).
 *
 * Prints {"ready": true, "connect_rate": R, "open": N} once every viewer is connected, then
 * reads commands on stdin, one per line, and answers each with one JSON line:
 *   reset        zero the counters
 *   report       the counters (see `report` below)
 *   status       the same without the latency percentiles (cheap: for polling)
 *   dump PATH    write the latencies since the last reset to PATH (int64 microseconds, native
 *                byte order), for a caller merging several processes' percentiles
 *   leave        every open viewer closes (1000) and stays away, keeping its cursor
 *   back         every viewer that left reconnects, resuming from its cursor
 *   quit         (or end of input) exit
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* One read; a connection keeps a buffer of its own only for a frame split across reads. */
#define SCRATCH (256 * 1024)
#define BACKOFF_CAP_S 30.0

enum state {
    IDLE,       /* not connected: never started, closed for good, left, or waiting to retry */
    CONNECTING, /* TCP connect in progress */
    HANDSHAKE,  /* upgrade request sent, waiting for the 101 */
    OPEN,       /* frames flow */
    CLOSING,    /* a close frame went either way: waiting for the server to close TCP */
};

/* What happens to a viewer once its connection is gone. */
enum after { AFTER_STAY, AFTER_RETRY, AFTER_LEAVE };

struct conn {
    int fd;
    uint8_t state;
    uint8_t after;    /* enum after, decided when the close began */
    uint8_t failures; /* attempts in a row that did not reach a welcome */
    uint8_t resumed;  /* this connection asked for since= */
    uint8_t welcomed; /* this connection got its welcome */
    uint8_t left;     /* closed by "leave": "back" reconnects it */
    uint8_t timed;    /* waiting to retry (its retry is in the timer heap) */
    uint8_t slot;     /* holds one of the `parallel` opening slots until its 101 or failure */
    uint8_t drop;     /* refused at the handshake: drop the connection after this read */
    char epoch[9];
    int url;
    uint32_t len, cap; /* a partial frame kept between reads */
    unsigned char *buf;
    int64_t last; /* last offset this viewer saw; -1 before its first welcome */
    uint32_t attempt; /* connection attempts so far: tells a timer of this one from older ones */
};

struct url {
    char host[256];
    char port[16];
    char path[4096];
    struct sockaddr_in addr;
};

static struct url *urls; /* one per --url and per line of --urls */
static int n_urls;
static struct conn *conns;
static int n_conns;
static int epfd;
static int n_sources;
static int reconnect;
static double backoff_s = 0.5;
static int parallel = 200;
static unsigned char scratch[SCRATCH];

static uint64_t events, frames, closed, dups, gaps, gap_notices, drops, refused, retries;
static uint64_t reconnects, recovered, unrecovered, connect_errors, left_count, open_timeouts;
/* Kinds of connect_errors: the TCP connect failed (refused, reset), or the connection was lost
 * before its 101; and connections lost while open without a close frame. */
static uint64_t connect_failed, handshake_lost, open_lost;
static int in_flight; /* connections holding a slot (struct conn.slot) */
static int n_open;    /* connections in state OPEN */
static int64_t *latencies;
static size_t n_lat, cap_lat;
static double cpu0;

/* Timers, earliest first (a binary heap): a viewer's retry, or the deadline of one of its
 * connection attempts (stale once the attempt is over: `attempt` tells). */
enum timer { RETRY, OPEN_DEADLINE };
struct timer_entry {
    double due;
    int idx;
    uint32_t attempt;
    int kind;
};
static struct timer_entry *heap;
static int n_heap, cap_heap;
static int n_retrying; /* viewers waiting for their retry */
static double open_timeout_s = 10.0;
/* Viewers waiting for a connection slot (connect phase, "back"): a FIFO of indexes. */
static int *queue;
static int q_head, q_tail;

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
    /* Resolved once: 100,000 getaddrinfo calls would cost more than the connects. */
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(u->host, u->port, &hints, &ai) != 0) die("getaddrinfo");
    memcpy(&u->addr, ai->ai_addr, sizeof(u->addr));
    freeaddrinfo(ai);
}

static int cap_urls;

static void add_url(const char *text) {
    if (n_urls == cap_urls) {
        cap_urls = cap_urls ? cap_urls * 2 : 16;
        urls = realloc(urls, (size_t)cap_urls * sizeof(*urls));
        if (!urls) die("realloc");
    }
    parse_url(text, &urls[n_urls++]);
}

/* One URL a line: 10,000 sites' URLs do not fit on a command line. */
static void add_urls(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    char line[8192];
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (line[0]) add_url(line);
    }
    fclose(f);
}

static void raise_fd_limit(rlim_t need) {
    struct rlimit nofile;
    getrlimit(RLIMIT_NOFILE, &nofile);
    if (nofile.rlim_max < need) {
        /* Root may raise the hard limit itself, up to fs.nr_open. */
        rlim_t cap = need;
        FILE *f = fopen("/proc/sys/fs/nr_open", "r");
        unsigned long nr_open;
        if (f && fscanf(f, "%lu", &nr_open) == 1 && nr_open < cap) cap = nr_open;
        if (f) fclose(f);
        struct rlimit higher = {cap, cap};
        if (setrlimit(RLIMIT_NOFILE, &higher) == 0) return;
    }
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
    if (nofile.rlim_max < need)
        fprintf(stderr, "viewers: RLIMIT_NOFILE is %lu, %lu viewers need %lu (run as root)\n",
                (unsigned long)nofile.rlim_max, (unsigned long)n_conns, (unsigned long)need);
}

/* -- timers ------------------------------------------------------------------------------ */

static void heap_push(double due, int idx, int kind) {
    if (n_heap == cap_heap) {
        cap_heap = cap_heap ? cap_heap * 2 : 1024;
        heap = realloc(heap, (size_t)cap_heap * sizeof(*heap));
        if (!heap) die("realloc");
    }
    struct timer_entry entry = {due, idx, conns[idx].attempt, kind};
    int i = n_heap++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (heap[parent].due <= due) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = entry;
}

static struct timer_entry heap_pop(void) {
    struct timer_entry top = heap[0], last = heap[--n_heap];
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= n_heap) break;
        if (child + 1 < n_heap && heap[child + 1].due < heap[child].due) child++;
        if (heap[child].due >= last.due) break;
        heap[i] = heap[child];
        i = child;
    }
    if (n_heap) heap[i] = last;
    return top;
}

/* -- connections ------------------------------------------------------------------------- */

static int i_of(const struct conn *c) {
    return (int)(c - conns);
}

static void watch(struct conn *c, uint32_t what, int op) {
    struct epoll_event ev = {.events = what, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void schedule_retry(struct conn *c);

static void release_slot(struct conn *c) {
    if (c->slot) {
        c->slot = 0;
        in_flight--;
    }
}

static void start_connect(struct conn *c) {
    struct url *u = &urls[c->url];
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (n_sources) {
        /* The port is picked at connect(), per (source, destination) pair, not at bind():
         * without IP_BIND_ADDRESS_NO_PORT a bound source would get ~28,000 ports in all. */
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
        struct sockaddr_in src = {.sin_family = AF_INET};
        int i = (int)(c - conns);
        src.sin_addr.s_addr = htonl(0x7F000002u + (uint32_t)(i % n_sources));
        if (bind(c->fd, (struct sockaddr *)&src, sizeof(src)) < 0) die("bind");
    }
    c->state = CONNECTING;
    c->welcomed = 0;
    c->len = 0;
    c->attempt++;
    /* A gateway that accepted nothing (full backlog, no file left) must not hold a viewer
     * forever: a real client gives up on an attempt and retries. */
    heap_push(monotonic() + open_timeout_s, i_of(c), OPEN_DEADLINE);
    if (connect(c->fd, (struct sockaddr *)&u->addr, sizeof(u->addr)) < 0 &&
        errno != EINPROGRESS) {
        if (errno != EADDRNOTAVAIL && errno != ECONNREFUSED && errno != EAGAIN) die("connect");
        fprintf(stderr, "connect: %s\n", strerror(errno));
        close(c->fd);
        c->fd = -1;
        c->state = IDLE;
        connect_errors++;
        connect_failed++;
        c->after = reconnect ? AFTER_RETRY : AFTER_STAY;
        if (c->after == AFTER_RETRY) schedule_retry(c);
        else closed++;
        return;
    }
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

/* Starts what waits for a slot, at most `parallel` opening at once. */
static void start_queued(void) {
    while (in_flight < parallel && q_head != q_tail) {
        struct conn *c = &conns[queue[q_head]];
        q_head = (q_head + 1) % (n_conns + 1);
        c->slot = 1;
        in_flight++;
        start_connect(c);
        if (c->state == IDLE) release_slot(c);
    }
}

static void enqueue(struct conn *c) {
    queue[q_tail] = (int)(c - conns);
    q_tail = (q_tail + 1) % (n_conns + 1);
}

static void send_all(struct conn *c, const void *data, size_t len) {
    /* Handshakes, pongs and close frames are tiny: the socket buffer always has room. */
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
    char req[8192], since[64] = "";
    c->resumed = c->last >= 0 && c->epoch[0];
    if (c->resumed) snprintf(since, sizeof(since), "&since=%s-%lld", c->epoch, (long long)c->last);
    int n = snprintf(req, sizeof(req),
                     "GET %s%s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     u->path, since, u->host, u->port);
    send_all(c, req, (size_t)n);
    c->state = HANDSHAKE;
    watch(c, EPOLLIN, EPOLL_CTL_MOD);
}

static void schedule_retry(struct conn *c) {
    double delay = backoff_s;
    for (int i = 0; i < c->failures && delay < BACKOFF_CAP_S; i++) delay *= 2;
    if (delay > BACKOFF_CAP_S) delay = BACKOFF_CAP_S;
    delay *= 0.5 + (double)rand() / RAND_MAX; /* +/-50 % */
    if (c->failures < 255) c->failures++;
    retries++;
    c->timed = 1;
    n_retrying++;
    heap_push(monotonic() + delay, i_of(c), RETRY);
}

/* The connection is gone (closed by either side, or failed): free it, then do what was
 * decided for this viewer. */
static void finish(struct conn *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
    if (c->state == OPEN) n_open--;
    c->state = IDLE;
    c->drop = 0;
    release_slot(c);
    if (c->after == AFTER_RETRY) {
        drops++;
        schedule_retry(c);
    } else if (c->after == AFTER_LEAVE) {
        c->left = 1;
        left_count++;
    } else {
        closed++;
    }
}

static void send_close(struct conn *c, unsigned code) {
    /* Masked with a zero mask, as a client must; the payload is the code. */
    unsigned char frame[8] = {0x88, 0x82, 0, 0, 0, 0, (unsigned char)(code >> 8),
                              (unsigned char)code};
    send_all(c, frame, sizeof(frame));
}

static void record_latency(int64_t us) {
    if (n_lat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 1 << 20;
        latencies = realloc(latencies, cap_lat * sizeof(*latencies));
        if (!latencies) die("realloc");
    }
    latencies[n_lat++] = us;
}

static int64_t read_int(const unsigned char *p, const unsigned char *end) {
    int64_t value = 0;
    for (int digits = 0; p < end && *p >= '0' && *p <= '9' && digits < 19; digits++)
        value = value * 10 + (*p++ - '0');
    return value;
}

#define STARTS(p, len, lit) ((len) >= sizeof(lit) - 1 && memcmp((p), (lit), sizeof(lit) - 1) == 0)

/* {"type":"welcome","site":...,"epoch":"E","cursor":"E-N" or null,"recovered":...} */
static void on_welcome(struct conn *c, const unsigned char *p, size_t len) {
    static const char EPOCH[] = "\"epoch\":\"", CURSOR[] = "\"cursor\":\"",
                      RECOVERED[] = "\"recovered\":true";
    const unsigned char *end = p + len;
    const unsigned char *e = memmem(p, len, EPOCH, sizeof(EPOCH) - 1);
    if (e && end - e >= (ptrdiff_t)(sizeof(EPOCH) - 1 + 8)) {
        memcpy(c->epoch, e + sizeof(EPOCH) - 1, 8);
        c->epoch[8] = 0;
    }
    if (c->resumed) {
        if (memmem(p, len, RECOVERED, sizeof(RECOVERED) - 1)) recovered++;
        else unrecovered++;
        reconnects++;
    } else if (c->last < 0) {
        /* A first connection starts live: after the cursor its welcome names (the head). */
        const unsigned char *k = memmem(p, len, CURSOR, sizeof(CURSOR) - 1);
        const unsigned char *dash = k ? memchr(k, '-', (size_t)(end - k)) : NULL;
        c->last = dash ? read_int(dash + 1, end) : 0;
    }
    c->welcomed = 1;
    c->failures = 0;
}

static void on_events(struct conn *c, const unsigned char *p, size_t len) {
    static const char OFFSET[] = "\"offset\":", T0[] = "\"t0\":";
    const unsigned char *end = p + len, *at = p;
    while ((at = memmem(at, (size_t)(end - at), OFFSET, sizeof(OFFSET) - 1))) {
        at += sizeof(OFFSET) - 1;
        int64_t offset = read_int(at, end);
        events++;
        if (c->last >= 0) {
            if (offset <= c->last) dups++;
            else if (offset > c->last + 1) gaps++;
        }
        if (offset > c->last) c->last = offset;
    }
    const unsigned char *t0 = memmem(p, len, T0, sizeof(T0) - 1);
    if (t0) {
        int64_t value = read_int(t0 + sizeof(T0) - 1, end);
        if (value) record_latency((wall_ns() - value) / 1000);
    }
}

static void on_data(struct conn *c, const unsigned char *p, size_t len) {
    frames++;
    if (STARTS(p, len, "{\"type\":\"welcome\"")) on_welcome(c, p, len);
    else if (STARTS(p, len, "{\"type\":\"gap\"")) gap_notices++;
    else on_events(c, p, len);
}

static void send_pong(struct conn *c, const unsigned char *payload, size_t len) {
    unsigned char frame[2 + 4 + 125];
    if (len > 125) return;
    frame[0] = 0x8A;                      /* FIN + pong */
    frame[1] = 0x80 | (unsigned char)len; /* masked, as a client must */
    memset(frame + 2, 0, 4);              /* a zero mask leaves the payload as it is */
    memcpy(frame + 6, payload, len);
    send_all(c, frame, 6 + len);
}

static void on_close_frame(struct conn *c, const unsigned char *payload, size_t len) {
    unsigned code = len >= 2 ? (unsigned)payload[0] << 8 | payload[1] : 1005;
    if (c->state == CLOSING) return; /* the answer to our own close */
    if (code == 4000 && !c->welcomed) refused++; /* a draining gateway turned it away */
    int again = (code >= 4000 && code < 4500) || code == 1012;
    c->after = reconnect && again ? AFTER_RETRY : AFTER_STAY;
    /* Answer, then let the server close TCP first: its side keeps the TIME_WAIT, and this
     * viewer's port is free again at once. */
    send_close(c, len >= 2 ? code : 1000);
    if (c->state == OPEN) n_open--;
    c->state = CLOSING;
}

/* Parse every complete frame in p[0..len); returns the bytes used. */
static size_t parse_frames(struct conn *c, unsigned char *p, size_t len) {
    size_t pos = 0;
    while (len - pos >= 2 && (c->state == OPEN || c->state == CLOSING)) {
        unsigned char *f = p + pos;
        int opcode = f[0] & 0x0F, masked = f[1] & 0x80;
        uint64_t plen = f[1] & 0x7F;
        size_t head = 2;
        if (plen == 126) {
            if (len - pos < 4) break;
            plen = ((uint64_t)f[2] << 8) | f[3];
            head = 4;
        } else if (plen == 127) {
            if (len - pos < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | f[2 + i];
            head = 10;
        }
        if (masked) head += 4;
        if (len - pos < head || plen > len - pos - head) break; /* not all here yet */
        unsigned char *payload = f + head;
        if (masked) {
            for (uint64_t i = 0; i < plen; i++) payload[i] ^= f[head - 4 + (i & 3)];
        }
        if (c->state == OPEN && (opcode == 1 || opcode == 2)) {
            on_data(c, payload, plen);
        } else if (c->state == OPEN && opcode == 9) {
            send_pong(c, payload, plen);
        } else if (opcode == 8) {
            on_close_frame(c, payload, plen);
        }
        pos += head + plen;
    }
    return pos;
}

/* Bytes read: the handshake's answer, then frames. Returns the bytes used. */
static size_t on_bytes(struct conn *c, unsigned char *p, size_t len) {
    size_t used = 0;
    if (c->state == HANDSHAKE) {
        unsigned char *end = memmem(p, len, "\r\n\r\n", 4);
        if (!end) return 0;
        if (len < 12 || memcmp(p + 9, "101", 3) != 0) {
            fprintf(stderr, "handshake refused: %.*s\n", (int)(len < 200 ? len : 200), p);
            c->after = AFTER_STAY;
            c->drop = 1;
            return len;
        }
        used = (size_t)(end - p) + 4;
        c->state = OPEN;
        n_open++;
        release_slot(c);
    }
    return used + parse_frames(c, p + used, len - used);
}

/* What a read brought: parsed in place when nothing is pending, else behind what is. */
static void feed(struct conn *c, unsigned char *data, size_t n) {
    if (c->len == 0) {
        size_t used = on_bytes(c, data, n);
        data += used, n -= used;
        if (n == 0) return;
    }
    if (c->cap - c->len < n) {
        size_t cap = c->cap ? c->cap : 4096;
        while (cap - c->len < n) cap *= 2;
        c->buf = realloc(c->buf, cap);
        if (!c->buf) die("realloc");
        c->cap = (uint32_t)cap;
    }
    memcpy(c->buf + c->len, data, n);
    c->len += (uint32_t)n;
    if (c->len == n) return; /* just saved what the parse above left */
    size_t used = on_bytes(c, c->buf, c->len);
    memmove(c->buf, c->buf + used, c->len - used);
    c->len -= (uint32_t)used;
}

static void on_readable(struct conn *c) {
    for (;;) {
        ssize_t n = recv(c->fd, scratch, sizeof(scratch), 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) { /* closed or failed: what was read before still counts */
            if (c->state != CLOSING) {
                /* Lost without a close frame: a reset, or a gateway that stopped. */
                c->after = reconnect ? AFTER_RETRY : AFTER_STAY;
            }
            if (c->state == HANDSHAKE || c->state == CONNECTING) {
                connect_errors++;
                handshake_lost++;
            } else if (c->state == OPEN) {
                open_lost++;
            }
            finish(c);
            return;
        }
        feed(c, scratch, (size_t)n);
        if (c->drop) {
            finish(c);
            return;
        }
        if ((size_t)n < sizeof(scratch)) return; /* drained the socket: no second recv */
    }
}

static void on_event(struct conn *c, uint32_t what) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (what & (EPOLLERR | EPOLLHUP))) {
            if (!reconnect) fprintf(stderr, "connect: %s\n", strerror(err));
            connect_errors++;
            connect_failed++;
            c->after = reconnect ? AFTER_RETRY : AFTER_STAY;
            finish(c);
            return;
        }
        send_handshake(c);
    } else if (c->state != IDLE) {
        on_readable(c);
    }
}

/* -- commands ---------------------------------------------------------------------------- */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The counters as one JSON line; `percentiles` 0 skips sorting the latencies (a caller
 * polling during a storm must not cost the viewers' core a sort of millions each time). */
static void report(int percentiles) {
    double cpu = cpu_seconds() - cpu0;
    char p50[32] = "NaN", p99[32] = "NaN", max[32] = "NaN";
    if (n_lat && percentiles) {
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
    int open = 0, welcomed = 0, caught = 0;
    long long min_last = -1, max_last = -1;
    for (int i = 0; i < n_conns; i++) {
        struct conn *c = &conns[i];
        if (c->state == OPEN) {
            open++;
            welcomed += c->welcomed;
        }
        if (c->last >= 0) {
            caught++;
            if (min_last < 0 || c->last < min_last) min_last = c->last;
            if (c->last > max_last) max_last = c->last;
        }
    }
    printf("{\"events\": %llu, \"frames\": %llu, \"closed\": %llu, \"p50_ms\": %s, "
           "\"p99_ms\": %s, \"max_ms\": %s, \"cpu_s\": %.6f, \"latencies\": %zu, "
           "\"open\": %d, \"welcomed\": %d, \"with_cursor\": %d, \"min_last\": %lld, "
           "\"max_last\": %lld, \"dups\": %llu, \"gaps\": %llu, \"gap_notices\": %llu, "
           "\"drops\": %llu, \"retries\": %llu, \"refused\": %llu, \"reconnects\": %llu, "
           "\"recovered\": %llu, \"unrecovered\": %llu, \"connect_errors\": %llu, "
           "\"left\": %llu, \"open_timeouts\": %llu, \"connect_failed\": %llu, "
           "\"handshake_lost\": %llu, \"open_lost\": %llu}\n",
           (unsigned long long)events, (unsigned long long)frames, (unsigned long long)closed,
           p50, p99, max, cpu, n_lat, open, welcomed, caught, min_last, max_last,
           (unsigned long long)dups, (unsigned long long)gaps, (unsigned long long)gap_notices,
           (unsigned long long)drops, (unsigned long long)retries, (unsigned long long)refused,
           (unsigned long long)reconnects, (unsigned long long)recovered,
           (unsigned long long)unrecovered, (unsigned long long)connect_errors,
           (unsigned long long)left_count, (unsigned long long)open_timeouts,
           (unsigned long long)connect_failed, (unsigned long long)handshake_lost,
           (unsigned long long)open_lost);
    fflush(stdout);
}

static void dump(const char *path) {
    FILE *f = fopen(path, "wb");
    size_t written = f ? fwrite(latencies, sizeof(*latencies), n_lat, f) : 0;
    if (f) fclose(f);
    printf("{\"dumped\": %zu}\n", written);
    fflush(stdout);
}

static void leave(void) {
    int count = 0;
    for (int i = 0; i < n_conns; i++) {
        struct conn *c = &conns[i];
        if (c->state != OPEN) continue;
        send_close(c, 1000);
        c->after = AFTER_LEAVE;
        c->state = CLOSING;
        n_open--;
        count++;
    }
    printf("{\"leaving\": %d}\n", count);
    fflush(stdout);
}

static void back(void) {
    int count = 0;
    for (int i = 0; i < n_conns; i++) {
        struct conn *c = &conns[i];
        if (!c->left || c->state != IDLE) continue;
        c->left = 0;
        c->after = AFTER_STAY;
        start_connect(c); /* all at once, as visitors coming back do not queue */
        count++;
    }
    printf("{\"back\": %d}\n", count);
    fflush(stdout);
}

/* Returns 0 when told to quit. */
static int on_command(void) {
    static char line[4096];
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
            events = frames = closed = dups = gaps = gap_notices = drops = refused = 0;
            reconnects = recovered = unrecovered = connect_errors = retries = left_count = 0;
            open_timeouts = connect_failed = handshake_lost = open_lost = 0;
            n_lat = 0;
            cpu0 = cpu_seconds();
            printf("{\"reset\": true}\n");
            fflush(stdout);
        } else if (strcmp(line, "report") == 0) {
            report(1);
        } else if (strcmp(line, "status") == 0) {
            report(0);
        } else if (strncmp(line, "dump ", 5) == 0) {
            dump(line + 5);
        } else if (strcmp(line, "leave") == 0) {
            leave();
        } else if (strcmp(line, "back") == 0) {
            back();
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

/* -- main -------------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr, "usage: viewers --count N --url ws://HOST:PORT/PATH [--url ...] "
                    "[--urls FILE] [--sources S] [--reconnect] [--backoff-ms B] [--parallel P] "
                    "[--deadline SECONDS] [--open-timeout SECONDS]\n");
    exit(2);
}

/* Retries and open deadlines that are due. */
static void run_timers(void) {
    double now = monotonic();
    while (n_heap && heap[0].due <= now) {
        struct timer_entry t = heap_pop();
        struct conn *c = &conns[t.idx];
        if (t.kind == RETRY) {
            c->timed = 0;
            n_retrying--;
            if (c->state == IDLE) start_connect(c);
        } else if (t.attempt == c->attempt && (c->state == CONNECTING || c->state == HANDSHAKE)) {
            open_timeouts++;
            connect_errors++;
            c->after = reconnect ? AFTER_RETRY : AFTER_STAY;
            finish(c);
        }
    }
}

static int timeout_ms(int idle_ms) {
    if (!n_heap) return idle_ms;
    double wait = (heap[0].due - monotonic()) * 1000;
    if (wait <= 0) return 0;
    return wait < idle_ms || idle_ms < 0 ? (int)wait + 1 : idle_ms;
}

int main(int argc, char **argv) {
    double deadline_s = 60.0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--count") == 0 && i + 1 < argc) {
            n_conns = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--url") == 0 && i + 1 < argc) {
            add_url(argv[++i]);
        } else if (strcmp(argv[i], "--urls") == 0 && i + 1 < argc) {
            add_urls(argv[++i]);
        } else if (strcmp(argv[i], "--sources") == 0 && i + 1 < argc) {
            n_sources = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--reconnect") == 0) {
            reconnect = 1;
        } else if (strcmp(argv[i], "--backoff-ms") == 0 && i + 1 < argc) {
            backoff_s = atof(argv[++i]) / 1000.0;
        } else if (strcmp(argv[i], "--parallel") == 0 && i + 1 < argc) {
            parallel = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--open-timeout") == 0 && i + 1 < argc) {
            open_timeout_s = atof(argv[++i]);
        } else if (strcmp(argv[i], "--deadline") == 0 && i + 1 < argc) {
            deadline_s = atof(argv[++i]);
        } else {
            usage();
        }
    }
    if (n_conns <= 0 || n_urls == 0 || parallel <= 0 || n_sources < 0 || n_sources > 250)
        usage();
    for (int i = 0; i < n_urls && n_sources; i++) {
        if ((ntohl(urls[i].addr.sin_addr.s_addr) >> 24) != 127) {
            fprintf(stderr, "--sources needs loopback URLs: %s\n", urls[i].host);
            return 2;
        }
    }
    raise_fd_limit((rlim_t)n_conns + 64);
    srand((unsigned)(getpid() ^ (unsigned)wall_ns()));

    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    conns = calloc((size_t)n_conns, sizeof(*conns));
    queue = calloc((size_t)n_conns + 1, sizeof(*queue));
    if (!conns || !queue) die("calloc");
    for (int i = 0; i < n_conns; i++) {
        conns[i].url = i % n_urls;
        conns[i].fd = -1;
        conns[i].last = -1;
        enqueue(&conns[i]);
    }

    struct epoll_event *ready = calloc(1024, sizeof(*ready));
    if (!ready) die("calloc");
    double started = monotonic();
    cpu0 = cpu_seconds();
    /* The connect phase: every viewer once, at most `parallel` opening at once. A viewer
     * that fails is retried (with --reconnect) or counted as closed. */
    for (;;) {
        start_queued();
        run_timers();
        /* Settled: nothing waits for a slot, is opening, or waits to retry. */
        if (q_head == q_tail && in_flight == 0 && n_retrying == 0) {
            int busy = 0; /* opening outside a slot: a retry that went out */
            for (int i = 0; i < n_conns && !busy; i++)
                busy = conns[i].state == CONNECTING || conns[i].state == HANDSHAKE;
            if (!busy) break;
        }
        if (monotonic() - started > deadline_s) {
            fprintf(stderr, "viewers: %d not open after %.0f s\n", n_conns - n_open,
                    deadline_s);
            for (int i = 0; i < n_conns; i++) {
                struct conn *c = &conns[i];
                if (c->state != OPEN && c->state != IDLE) {
                    c->after = AFTER_STAY;
                    finish(c);
                }
            }
            break;
        }
        int n = epoll_wait(epfd, ready, 1024, timeout_ms(100));
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) on_event(&conns[ready[i].data.u32], ready[i].events);
    }
    double rate = n_open / (monotonic() - started);
    printf("{\"ready\": true, \"connect_rate\": %.3f, \"open\": %d}\n", rate, n_open);
    fflush(stdout);

    struct epoll_event in = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, STDIN_FILENO, &in) < 0) die("epoll_ctl stdin");
    for (;;) {
        start_queued();
        int n = epoll_wait(epfd, ready, 1024, timeout_ms(-1));
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (ready[i].data.u32 == UINT32_MAX) {
                if (!on_command()) return 0;
                continue;
            }
            on_event(&conns[ready[i].data.u32], ready[i].events);
        }
        run_timers();
    }
}
