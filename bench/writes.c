/* The host's floor for one fan-out write: a 360-byte frame written to each of 1,000 loopback
 * TCP connections, in C, with no Python and no event loop on the sending side.
 *
 *   writes [--rounds N]
 *
 * The sender runs on core 0 and a reader child on core 1 (epoll, reads and discards), as the
 * bench places the gateway and the viewers. On loopback the sender's write() also runs the
 * receiver's TCP stack and its wake-up, so this is what a gateway pays per delivery here
 * before any code of ours runs (docs/performance.md). Prints one JSON line: the mean time per
 * write over all rounds, and the best round's.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CONNS 1000
#define FRAME_BYTES 360

static double monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void pin(int core) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(core, &set);
    sched_setaffinity(0, sizeof(set), &set); /* best effort: one core is fine too */
}

static void reader(struct sockaddr_in *addr) {
    pin(1);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < CONNS; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)addr, sizeof(*addr)) < 0) die("connect");
        fcntl(fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }
    static char buf[65536];
    struct epoll_event ready[1024];
    for (;;) {
        int n = epoll_wait(ep, ready, 1024, -1);
        for (int i = 0; i < n; i++) {
            if (recv(ready[i].data.fd, buf, sizeof(buf), 0) == 0) _exit(0);
        }
    }
}

int main(int argc, char **argv) {
    /* Each side holds ~1,005 descriptors: lift a 1,024 soft limit to the hard one. */
    struct rlimit files;
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
    }
    int rounds = 200;
    if (argc == 3 && strcmp(argv[1], "--rounds") == 0) rounds = atoi(argv[2]);
    if (rounds < 1) rounds = 1;
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0) die("bind");
    if (getsockname(listener, (struct sockaddr *)&addr, &len) < 0) die("getsockname");
    if (listen(listener, CONNS) < 0) die("listen");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) reader(&addr);
    pin(0);
    static int fds[CONNS];
    for (int i = 0; i < CONNS; i++) {
        fds[i] = accept(listener, NULL, NULL);
        if (fds[i] < 0) die("accept");
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* as uvicorn does */
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
    }
    char frame[FRAME_BYTES];
    memset(frame, 'x', sizeof(frame));
    double total = 0, best = 1e9;
    for (int r = 0; r < rounds; r++) {
        double started = monotonic();
        for (int i = 0; i < CONNS; i++) {
            if (write(fds[i], frame, sizeof(frame)) < 0) die("write");
        }
        double took = monotonic() - started;
        total += took;
        if (took < best) best = took;
        usleep(10000); /* a round every ~10 ms, as 2a's 100 events/s */
    }
    for (int i = 0; i < CONNS; i++) close(fds[i]);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    printf("{\"write_us_mean\": %.3f, \"write_us_best_round\": %.3f, \"rounds\": %d}\n",
           total / rounds / CONNS * 1e6, best / CONNS * 1e6, rounds);
    return 0;
}
