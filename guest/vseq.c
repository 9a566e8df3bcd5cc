/* vseq: a consistency-oracle member for VM guests, in C (the wire protocol of workloads/seqstream.py).
 *
 *   vseq --id 2 --bind 10.0.0.5 --peers 1=10.0.0.1,3=10.0.0.3 [--rate 500] [--size 120] [--no-tcp]
 *
 * On the kernel command line (violin.run=, see guest/init) commas become spaces, so peers may also be
 * separated by "+" (--peers 1=10.0.0.1+3=10.0.0.3), and extra "id=ip" arguments are peers too
 * ("--peers 1=10.0.0.1 3=10.0.0.3"); either way they keep their order.
 *
 * Every 1/rate s ("a tick", never bursting to catch up after a pause) it sends one UDP datagram
 * "!4sHHQ" (b"VSEQ", sender id, receiver id, seq), zero-padded to --size bytes, to each peer's port
 * 47000; seq is global per tick. Unless --no-tcp it also keeps ONE outgoing TCP connection to each
 * peer's port 47001 (a non-blocking connect, tried again every 0.2 s until it is up; never
 * re-opened once it broke) and appends one 16-byte record (b"VTCP", sender, receiver, seq 1, 2, 3...
 * per connection) to it per tick, writing what the kernel takes. It logs every datagram with the
 * kernel's arrival time and every record read from the connections it accepted on 47001.
 *
 * The log stays in memory (the guest has no disk). The host reads it over TCP port 47002 (see
 * workloads/guestctl.py): a client sends one line and reads the reply until the connection closes:
 *   "STOP\n" -> stop sending and connecting (keep receiving; queued TCP data is still flushed), "OK\n"
 *   "DUMP\n" -> "id <id>\n" "peers <p1> <p2> ...\n" (--peers order),
 *               "progress <peer> <udp_about> <udp_last> <tcp_about> <tcp_last>\n" per peer,
 *               the log ("<sender> <seq> <arrival_ns>\n" UDP, "t <sender> <seq> <arrival_ns>\n" TCP,
 *               in arrival order, as seqstream.py's log file), "end\n"
 *   anything else -> "ERR\n"
 * Progress: UDP about_to_send / last_sent are the seq before and after the sendto of a tick; TCP
 * about_to_send is the highest seq appended to the user-space buffer, last_sent the highest one whose
 * record the kernel accepted completely. One thread, driven by ppoll.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define UDP_PORT 47000
#define TCP_PORT 47001
#define CTL_PORT 47002
#define RECORD 16                   /* "!4sHHQ" */
#define RETRY_NS 200000000LL        /* an outgoing connection is attempted again this often */
#define CTL_LINGER_NS 10000000000LL /* a control client that never closes is dropped after this */

/* A growing byte buffer; data[off..len) is still to be consumed. */
struct buf {
    char *data;
    size_t off, len, cap;
};

struct peer {
    int id;
    struct sockaddr_in udp, tcp;
    int64_t udp_about, udp_last;
    int fd, up, broken;   /* the outgoing TCP stream */
    int64_t retry_at;     /* monotonic ns */
    uint64_t seq, taken;  /* records appended; bytes the kernel accepted */
    struct buf out;
};

struct incoming {  /* an accepted TCP stream and its partial record */
    int fd, have;
    unsigned char part[RECORD];
};

struct ctl {  /* a control client */
    int fd, replying, closing, dumping;
    int64_t since;
    size_t have;
    char line[64];
    struct buf reply;        /* formatted, not yet sent */
    size_t dump_next, dump_end;  /* log entries still to format (the log as it was at DUMP) */
};

struct entry {
    uint64_t seq;
    int64_t t;
    uint16_t sender;
    char proto;  /* 'u' or 't' */
};

static struct peer *peers;
static int npeers, my_id;
static struct incoming *incomings;
static int nincoming;
static struct ctl *ctls;
static int nctl;
static struct entry *logv;
static size_t nlog, caplog;
static volatile sig_atomic_t terminate;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("vseq: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void buf_append(struct buf *b, const void *data, size_t n)
{
    if (b->off && b->off == b->len)
        b->off = b->len = 0;
    if (b->len + n > b->cap) {
        if (b->off) {  /* compact before growing */
            memmove(b->data, b->data + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        while (b->len + n > b->cap)
            b->cap = b->cap ? 2 * b->cap : 4096;
        b->data = xrealloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void buf_printf(struct buf *b, const char *fmt, ...)
{
    char line[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    buf_append(b, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static void pack(unsigned char *p, const char *magic, int sender, int receiver, uint64_t seq)
{
    memcpy(p, magic, 4);
    p[4] = sender >> 8, p[5] = sender;
    p[6] = receiver >> 8, p[7] = receiver;
    for (int i = 0; i < 8; i++)
        p[8 + i] = seq >> (56 - 8 * i);
}

static void unpack(const unsigned char *p, int *sender, uint64_t *seq)
{
    *sender = p[4] << 8 | p[5];
    *seq = 0;
    for (int i = 0; i < 8; i++)
        *seq = *seq << 8 | p[8 + i];
}

static void log_entry(char proto, int sender, uint64_t seq, int64_t t)
{
    if (nlog == caplog) {
        caplog = caplog ? 2 * caplog : 4096;
        logv = xrealloc(logv, caplog * sizeof *logv);
    }
    logv[nlog++] = (struct entry){.seq = seq, .t = t, .sender = sender, .proto = proto};
}

/* Close with a reset, leaving no TIME-WAIT socket behind (as seqstream.py does). */
static void abortive(int fd)
{
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

static int listener(struct in_addr addr, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr = addr};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 64) < 0)
        die("cannot listen on TCP port %d: %s", port, strerror(errno));
    return fd;
}

/* Send one datagram, waiting for room in the socket buffer rather than dropping it. */
static void send_datagram(int fd, const void *data, size_t n, const struct sockaddr_in *to)
{
    for (int attempt = 0; attempt < 50; attempt++) {
        if (sendto(fd, data, n, 0, (const struct sockaddr *)to, sizeof *to) >= 0)
            return;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return;  /* e.g. no route yet: a loss the receiver will show */
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        poll(&p, 1, 10);
    }
}

static void tcp_close(struct peer *p)
{
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
}

/* Start a connection attempt when one is due; an attempt still pending after RETRY_NS starts afresh. */
static void tcp_connect(struct peer *p, struct in_addr bind_addr, int64_t now)
{
    if (p->up || p->broken || now < p->retry_at)
        return;
    tcp_close(p);
    p->retry_at = now + RETRY_NS;
    p->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p->fd < 0)
        return;
    int one = 1;
    abortive(p->fd);
    setsockopt(p->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_addr = bind_addr};
    if (bind(p->fd, (struct sockaddr *)&local, sizeof local) < 0) {
        tcp_close(p);
        return;
    }
    if (connect(p->fd, (struct sockaddr *)&p->tcp, sizeof p->tcp) == 0) {
        p->up = 1;
        printf("vseq: tcp to peer %d up\n", p->id);
    } else if (errno != EINPROGRESS)
        tcp_close(p);
}

static void tcp_connected(struct peer *p)
{
    int error = 0;
    socklen_t len = sizeof error;
    if (getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0) {
        p->up = 1;
        printf("vseq: tcp to peer %d up\n", p->id);
    } else
        tcp_close(p);
}

/* Write what the kernel takes; a write error breaks the stream for good. */
static void tcp_flush(struct peer *p)
{
    size_t n = p->out.len - p->out.off;
    if (!n)
        return;
    ssize_t taken = send(p->fd, p->out.data + p->out.off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (taken < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        printf("vseq: tcp to peer %d broken: %s\n", p->id, strerror(errno));
        tcp_close(p);
        p->up = 0, p->broken = 1;
        return;
    }
    p->out.off += taken;
    p->taken += taken;
}

static void receive_datagrams(int fd)
{
    unsigned char data[2048];
    char control[256];
    for (;;) {
        struct iovec iov = {data, sizeof data};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT);
        if (n < 0)
            return;
        if (n < RECORD || memcmp(data, "VSEQ", 4))
            continue;
        int64_t arrival = now_ns(CLOCK_REALTIME);
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                struct timespec ts;
                memcpy(&ts, CMSG_DATA(c), sizeof ts);
                arrival = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
            }
        int sender;
        uint64_t seq;
        unpack(data, &sender, &seq);
        log_entry('u', sender, seq, arrival);
    }
}

static void accept_streams(int fd)
{
    for (;;) {
        int conn = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (conn < 0)
            return;
        abortive(conn);
        incomings = xrealloc(incomings, (nincoming + 1) * sizeof *incomings);
        incomings[nincoming++] = (struct incoming){.fd = conn};
    }
}

/* Read what arrived on one accepted stream and log its complete records; 0 at EOF or error. */
static int receive_records(struct incoming *in)
{
    unsigned char data[65536];
    ssize_t n = recv(in->fd, data, sizeof data, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 1;
    if (n <= 0)
        return 0;
    int64_t arrival = now_ns(CLOCK_REALTIME);
    for (ssize_t i = 0; i < n; i++) {
        in->part[in->have++] = data[i];
        if (in->have == RECORD) {
            int sender;
            uint64_t seq;
            unpack(in->part, &sender, &seq);
            if (!memcmp(in->part, "VTCP", 4))
                log_entry('t', sender, seq, arrival);
            in->have = 0;
        }
    }
    return 1;
}

/* The head of a DUMP reply; the log lines follow as the client reads (dump_more), then "end". */
static void dump_start(struct ctl *c)
{
    struct buf *b = &c->reply;
    buf_printf(b, "id %d\npeers", my_id);
    for (int i = 0; i < npeers; i++)
        buf_printf(b, " %d", peers[i].id);
    buf_printf(b, "\n");
    for (int i = 0; i < npeers; i++) {
        struct peer *p = &peers[i];
        buf_printf(b, "progress %d %lld %lld %llu %llu\n", p->id, (long long)p->udp_about,
                   (long long)p->udp_last, (unsigned long long)p->seq,
                   (unsigned long long)(p->taken / RECORD));
    }
    c->dumping = 1, c->dump_next = 0, c->dump_end = nlog;
}

/* Format the next log lines (a bounded chunk: a long log is never copied whole). */
static void dump_more(struct ctl *c)
{
    for (int n = 0; n < 2048 && c->dump_next < c->dump_end; n++) {
        struct entry *e = &logv[c->dump_next++];
        buf_printf(&c->reply, "%s%d %llu %lld\n", e->proto == 't' ? "t " : "", e->sender,
                   (unsigned long long)e->seq, (long long)e->t);
    }
    if (c->dump_next == c->dump_end) {
        buf_printf(&c->reply, "end\n");
        c->dumping = 0;
    }
}

/* Read a control client's line and answer it; 0 once the client can be closed. */
static int control(struct ctl *c, int *stopped, int64_t now)
{
    if (c->replying) {  /* send the reply, then half-close and wait for the client's EOF */
        if (!c->closing) {
            if (c->dumping && c->reply.len - c->reply.off < 65536)
                dump_more(c);
            ssize_t n = send(c->fd, c->reply.data + c->reply.off, c->reply.len - c->reply.off,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
                return 0;
            if (n > 0)
                c->reply.off += n;
            if (c->reply.off == c->reply.len && !c->dumping) {
                shutdown(c->fd, SHUT_WR);
                c->closing = 1, c->since = now;
            }
            return 1;
        }
        char sink[256];
        ssize_t n = recv(c->fd, sink, sizeof sink, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) || now - c->since > CTL_LINGER_NS)
            return 0;
        return 1;
    }
    ssize_t n = recv(c->fd, c->line + c->have, sizeof c->line - 1 - c->have, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 1;
    if (n <= 0)
        return 0;
    c->have += n;
    c->line[c->have] = 0;
    char *nl = strchr(c->line, '\n');
    if (!nl && c->have < sizeof c->line - 1)
        return 1;
    if (nl)
        *nl = 0;
    if (nl > c->line && nl[-1] == '\r')
        nl[-1] = 0;
    if (nl && !strcmp(c->line, "STOP")) {
        if (!*stopped)
            printf("vseq: stopped\n");
        *stopped = 1;
        buf_printf(&c->reply, "OK\n");
    } else if (nl && !strcmp(c->line, "DUMP"))
        dump_start(c);
    else
        buf_printf(&c->reply, "ERR\n");
    c->replying = 1;
    return 1;
}

/* Peers "id=ip,id=ip,..." ("+" separates too), appended in order. */
static void add_peers(const char *text)
{
    char *list = strdup(text), *save = NULL;
    for (char *item = strtok_r(list, ",+", &save); item; item = strtok_r(NULL, ",+", &save)) {
        char *eq = strchr(item, '=');
        struct in_addr addr;
        if (!eq || inet_pton(AF_INET, eq + 1, &addr) != 1)
            die("bad peer '%s' (want id=ip)", item);
        peers = xrealloc(peers, (npeers + 1) * sizeof *peers);
        struct peer *p = &peers[npeers++];
        *p = (struct peer){.id = atoi(item), .fd = -1};
        p->udp = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(UDP_PORT), .sin_addr = addr};
        p->tcp = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(TCP_PORT), .sin_addr = addr};
    }
    free(list);
}

static void on_signal(int sig)
{
    (void)sig;
    terminate = 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: vseq --id N --bind IP [--peers id=ip,id=ip] [--rate R] [--size S] [--no-tcp]"
                    " [id=ip ...]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"id", required_argument, 0, 'i'},   {"bind", required_argument, 0, 'b'},
        {"peers", required_argument, 0, 'p'}, {"rate", required_argument, 0, 'r'},
        {"size", required_argument, 0, 's'},  {"no-tcp", no_argument, 0, 'n'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    const char *bind_ip = NULL, *peer_list = "";
    double rate = 500.0;
    long size = 120;
    int tcp = 1, have_id = 0, opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'i': my_id = atoi(optarg), have_id = 1; break;
        case 'b': bind_ip = optarg; break;
        case 'p': peer_list = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 's': size = atol(optarg); break;
        case 'n': tcp = 0; break;
        default: usage();
        }
    }
    struct in_addr bind_addr;
    if (!have_id || !bind_ip || inet_pton(AF_INET, bind_ip, &bind_addr) != 1)
        usage();
    if (size < RECORD)
        size = RECORD;
    if (size > 65507)
        die("--size %ld is larger than a UDP datagram", size);

    add_peers(peer_list);
    for (int i = optind; i < argc; i++)  /* "--peers 1=a 3=b": /init turned the list's commas into spaces */
        add_peers(argv[i]);

    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    setvbuf(stdout, NULL, _IOLBF, 0);

    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1, rcvbuf = 8 << 20;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(UDP_PORT), .sin_addr = bind_addr};
    setsockopt(udp, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
    setsockopt(udp, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    if (bind(udp, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("cannot bind UDP %s:%d: %s", bind_ip, UDP_PORT, strerror(errno));
    int tcp_listener = tcp ? listener(bind_addr, TCP_PORT) : -1;
    if (tcp_listener >= 0)
        abortive(tcp_listener);
    int ctl_listener = listener((struct in_addr){htonl(INADDR_ANY)}, CTL_PORT);
    printf("vseq: id %d bind %s peers", my_id, bind_ip);
    for (int i = 0; i < npeers; i++)
        printf(" %d=%s", peers[i].id, inet_ntoa(peers[i].udp.sin_addr));
    printf("%s rate %g size %ld tcp %s control port %d\n", npeers ? "" : " -", rate, size, tcp ? "on" : "off",
           CTL_PORT);

    unsigned char *datagram = calloc(1, size);
    uint64_t seq = 0;
    int stopped = 0;
    int64_t interval = rate > 0 ? (int64_t)(1e9 / rate) : 0;
    int64_t next_send = now_ns(CLOCK_MONOTONIC);
    struct pollfd *fds = NULL;

    while (!terminate) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        for (int i = 0; tcp && !stopped && i < npeers; i++)
            tcp_connect(&peers[i], bind_addr, now);
        if (interval && !stopped && now >= next_send) {
            seq++;
            for (int i = 0; i < npeers; i++) {
                peers[i].udp_about = seq;
                pack(datagram, "VSEQ", my_id, peers[i].id, seq);
                send_datagram(udp, datagram, size, &peers[i].udp);
                peers[i].udp_last = seq;
            }
            for (int i = 0; i < npeers; i++) {
                struct peer *p = &peers[i];
                if (!p->up)
                    continue;
                unsigned char record[RECORD];
                pack(record, "VTCP", my_id, p->id, ++p->seq);
                buf_append(&p->out, record, RECORD);
            }
            /* Keep the pace, but never burst to catch up after a pause (a snapshot, a restore). */
            next_send = next_send + interval > now - 2 * interval ? next_send + interval : now - 2 * interval;
        }
        for (int i = 0; i < npeers; i++)
            if (peers[i].up)
                tcp_flush(&peers[i]);

        int64_t wake = interval && !stopped ? next_send : now + RETRY_NS;
        for (int i = 0; tcp && !stopped && i < npeers; i++)
            if (!peers[i].up && !peers[i].broken && peers[i].retry_at < wake)
                wake = peers[i].retry_at;
        for (int i = 0; i < nctl; i++)
            if (ctls[i].closing && ctls[i].since + CTL_LINGER_NS < wake)
                wake = ctls[i].since + CTL_LINGER_NS;

        /* fds: udp, tcp listener, control listener, peers, incoming streams, control clients */
        int nfds = 3 + npeers + nincoming + nctl, k = 3;
        fds = xrealloc(fds, nfds * sizeof *fds);
        fds[0] = (struct pollfd){.fd = udp, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = tcp_listener, .events = POLLIN};
        fds[2] = (struct pollfd){.fd = ctl_listener, .events = POLLIN};
        for (int i = 0; i < npeers; i++, k++) {
            struct peer *p = &peers[i];
            int want = p->fd >= 0 && (!p->up || p->out.len > p->out.off);
            fds[k] = (struct pollfd){.fd = want ? p->fd : -1, .events = POLLOUT};
        }
        for (int i = 0; i < nincoming; i++, k++)
            fds[k] = (struct pollfd){.fd = incomings[i].fd, .events = POLLIN};
        for (int i = 0; i < nctl; i++, k++) {
            int out = ctls[i].replying && !ctls[i].closing;
            fds[k] = (struct pollfd){.fd = ctls[i].fd, .events = out ? POLLOUT : POLLIN};
        }
        int64_t left = wake - now_ns(CLOCK_MONOTONIC);
        if (left < 0)
            left = 0;
        struct timespec timeout = {left / 1000000000LL, left % 1000000000LL};
        if (ppoll(fds, nfds, &timeout, NULL) < 0) {
            if (errno == EINTR)
                continue;
            die("ppoll: %s", strerror(errno));
        }
        now = now_ns(CLOCK_MONOTONIC);

        k = 3;
        for (int i = 0; i < npeers; i++, k++)
            if (fds[k].fd >= 0 && fds[k].revents && !peers[i].up)
                tcp_connected(&peers[i]);
        if (fds[0].revents)
            receive_datagrams(udp);
        int j = 0;
        for (int i = 0; i < nincoming; i++, k++) {  /* read, dropping the streams that ended */
            if (fds[k].revents && !receive_records(&incomings[i]))
                close(incomings[i].fd);
            else
                incomings[j++] = incomings[i];
        }
        nincoming = j;
        j = 0;
        for (int i = 0; i < nctl; i++, k++) {  /* serve, dropping the clients that are done */
            struct ctl *c = &ctls[i];
            int expired = c->closing && now - c->since > CTL_LINGER_NS;
            if ((fds[k].revents || expired) && !control(c, &stopped, now)) {
                close(c->fd);
                free(c->reply.data);
            } else
                ctls[j++] = *c;
        }
        nctl = j;
        if (fds[1].revents)
            accept_streams(tcp_listener);
        if (fds[2].revents)
            for (;;) {
                int conn = accept4(ctl_listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (conn < 0)
                    break;
                ctls = xrealloc(ctls, (nctl + 1) * sizeof *ctls);
                ctls[nctl++] = (struct ctl){.fd = conn};
            }
    }
    printf("vseq: terminated\n");
    return 0;
}
