/*
 * vmandel: the distributed Mandelbrot demo of workloads/mandelbrot.py in C, for the busybox VM guests.
 *
 * It speaks the same wire protocol, so C and Python masters and workers mix freely, and it computes the
 * same pixels bit for bit: plain IEEE double arithmetic in the order of mandelbrot.render_row, and the
 * same integer palette.
 *
 *   vmandel master --bind 10.0.0.1 --port 47100 --width 320 --height 240 --iterations 500 --workers 3 \
 *                  [--image-port 47101]
 *   vmandel worker --master 10.0.0.1:47100 --id 1 [--delay-ms 200]
 *   vmandel render --width 320 --height 240 --iterations 500 >pixels.raw
 *
 * master: hands out rows as mandelbrot.py's master does (no row before --workers workers said hello; a
 *   worker whose connection closes loses its row to the next idle worker; DONE to every worker once the
 *   image is complete). A VM has no file system worth writing a PNG to, so the master serves the image on
 *   the image port instead (default: port + 1). A client that connects gets b"VMBI", then !IIII width,
 *   height, iterations, rows done, then -- only if every row is in -- the width * height pixel bytes, row 0
 *   first; then the master closes the connection (`mandelbrot.py fetch` turns that into the PNG). The master
 *   never exits by itself: once the image is complete it closes the worker connections still open
 *   LINGER_S later, answers late workers DONE and serves the image until SIGTERM (or SIGINT); then it
 *   exits 0. Progress goes to stdout.
 * worker: as mandelbrot.py's worker: retries connecting for 30 s, one row at a time, --delay-ms of sleep
 *   per row, reconnects when the connection is lost, exits 0 on DONE and 1 when no master answers.
 * render: the raw pixels of the whole image on stdout (row 0 first), to check against render_row.
 *
 * One thread, blocking sockets for the workers' protocol, poll(); IPv4 addresses only (no resolver, so a
 * static binary links without warnings). Build:
 *
 *   gcc -static -O2 -ffp-contract=off -Wall -o vmandel vmandel.c
 *
 * -ffp-contract=off matters where the target has fused multiply-add (aarch64, x86-64 with -march=haswell
 * and later): a fused a * b + c rounds once where Python rounds twice, and pixels would differ.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "vmandel needs doubles evaluated as doubles (FLT_EVAL_METHOD 0); on 32-bit x86 add -msse2 -mfpmath=sse"
#endif
#ifdef __FAST_MATH__
#error "vmandel must not be built with -ffast-math: its pixels would differ from mandelbrot.py's"
#endif

#define PORT 47100
static const double RE_MIN = -2.0, RE_MAX = 1.0; /* the fixed view window */
static const double IM_MIN = -1.2, IM_MAX = 1.2;

/* Framing: magic, message type, payload length (!4sBI); then the payload. */
#define MAGIC "VMB1"
#define HEADER_SIZE 9
#define HELLO 1  /* worker -> master: !I worker id; asks for work */
#define RESULT 2 /* worker -> master: !I row, then `width` pixel bytes; asks for more work */
#define ROW 3    /* master -> worker: !IIII row, width, height, iterations */
#define DONE 4   /* master -> worker: empty; the image is complete, exit */
#define MAX_PAYLOAD (1u << 24)

/* The image port: b"VMBI", !IIII width, height, iterations, rows done, then the pixels once complete. */
#define IMAGE_MAGIC "VMBI"
#define IMAGE_HEADER_SIZE 20

#define CONNECT_WINDOW_MS 30000  /* a worker retries connecting to the master this long */
#define CONNECT_TIMEOUT_MS 30000 /* one connection attempt */
#define RETRY_INTERVAL_MS 200
#define LINGER_MS 30000       /* after the image is complete, how long a worker may keep its connection */
#define IMAGE_CLIENT_MS 30000 /* an image client that does not read is given up after this */
#define IMAGE_DRAIN_MS 5000   /* after the last byte, how long to wait for the client to hang up */
static const int KEEPALIVE[3] = {60, 10, 6}; /* idle, interval, count: ~2 min, never across a freeze */

#define PALETTE_MAX (1u << 20) /* palettes up to this many iterations are tabulated */

/* --- small things ---------------------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static void header(uint8_t *p, int kind, uint32_t length)
{
    memcpy(p, MAGIC, 4);
    p[4] = (uint8_t)kind;
    put32(p + 5, length);
}

static void *xrealloc(void *old, size_t size)
{
    void *p = realloc(old, size ? size : 1);
    if (!p) {
        fprintf(stderr, "vmandel: out of memory (%zu bytes)\n", size);
        exit(1);
    }
    return p;
}

/* --- the image ------------------------------------------------------------------------------------- */

/* floor(sqrt(n)), exactly (mandelbrot._isqrt). */
static uint64_t isqrt_u64(uint64_t n)
{
    if (n < 2)
        return n;
    int bits = 64 - __builtin_clzll(n);
    uint64_t x = (uint64_t)1 << ((bits + 1) / 2);
    for (;;) {
        uint64_t y = (x + n / x) / 2;
        if (y >= x)
            return x;
        x = y;
    }
}

/* Gray level of escape count n: isqrt(isqrt(n * 255**4 // iterations)); inside (n == iterations) is black.
 * n < iterations < 2**32, so n * 255**4 < 2**64. */
static uint8_t level(uint32_t n, uint32_t iterations)
{
    if (n >= iterations)
        return 0;
    return (uint8_t)isqrt_u64(isqrt_u64((uint64_t)n * 4228250625u / iterations));
}

static uint8_t *palette_table;
static uint32_t palette_iterations;

/* The palette for `iterations` (iterations + 1 levels), or NULL if too large to tabulate. */
static const uint8_t *palette(uint32_t iterations)
{
    if (palette_table && palette_iterations == iterations)
        return palette_table;
    if (iterations > PALETTE_MAX)
        return NULL;
    uint8_t *table = malloc((size_t)iterations + 1);
    if (!table)
        return NULL;
    for (uint32_t n = 0; n <= iterations; n++)
        table[n] = level(n, iterations);
    free(palette_table);
    palette_table = table;
    palette_iterations = iterations;
    return table;
}

/* The `width` gray pixels of row y (row 0 is the top, the IM_MAX side): mandelbrot.render_row, operation for
 * operation. -1 if the row is outside the image or there are no iterations. */
static int render_row(uint32_t y, uint32_t width, uint32_t height, uint32_t iterations, uint8_t *out)
{
    if (!(y < height && width > 0 && iterations > 0))
        return -1;
    const uint8_t *levels = palette(iterations);
    double ci = IM_MAX - (IM_MAX - IM_MIN) * (double)(2 * (uint64_t)y + 1) / (double)(2 * (uint64_t)height);
    double ci2 = ci * ci;
    for (uint32_t x = 0; x < width; x++) {
        double cr = RE_MIN + (RE_MAX - RE_MIN) * (double)(2 * (uint64_t)x + 1) / (double)(2 * (uint64_t)width);
        /* Main cardioid and period-2 bulb: inside, no need to iterate. */
        double xq = cr - 0.25;
        double q = xq * xq + ci2;
        uint32_t n;
        if (q * (q + xq) <= 0.25 * ci2 || (cr + 1.0) * (cr + 1.0) + ci2 <= 0.0625) {
            n = iterations;
        } else {
            double zr = 0.0, zi = 0.0, zr2 = 0.0, zi2 = 0.0;
            n = 0;
            while (n < iterations && zr2 + zi2 <= 4.0) {
                zi = 2.0 * zr * zi + ci;
                zr = zr2 - zi2 + cr;
                zr2 = zr * zr;
                zi2 = zi * zi;
                n++;
            }
        }
        out[x] = levels ? levels[n] : level(n, iterations);
    }
    return 0;
}

/* --- the wire -------------------------------------------------------------------------------------- */

static int send_all(int fd, const void *data, size_t length)
{
    const uint8_t *p = data;
    while (length) {
        ssize_t n = send(fd, p, length, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        length -= (size_t)n;
    }
    return 0;
}

/* Exactly `length` bytes into `data` (NULL: read and discard them); -1 on error or end of stream. */
static int recv_exact(int fd, uint8_t *data, size_t length)
{
    uint8_t scratch[4096];
    while (length) {
        size_t want = length;
        uint8_t *into = data;
        if (!data && want > sizeof scratch)
            want = sizeof scratch;
        if (!data)
            into = scratch;
        ssize_t n = recv(fd, into, want, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        if (data)
            data += n;
        length -= (size_t)n;
    }
    return 0;
}

static void tune(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &KEEPALIVE[0], sizeof KEEPALIVE[0]);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &KEEPALIVE[1], sizeof KEEPALIVE[1]);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &KEEPALIVE[2], sizeof KEEPALIVE[2]);
}

static int set_nonblocking(int fd, int on)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -1;
    return fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
}

/* --- command lines --------------------------------------------------------------------------------- */

static const char USAGE[] =
    "usage: vmandel master [--bind IP] [--port PORT] [--width W] [--height H] [--iterations N]\n"
    "                      [--workers K] [--image-port PORT]\n"
    "       vmandel worker --master IP:PORT --id N [--delay-ms D]\n"
    "       vmandel render [--width W] [--height H] [--iterations N]   (raw pixels on stdout)\n";

struct option_slot {
    const char *name;
    const char *value;
};

static void usage_error(const char *fmt, const char *what)
{
    fputs(USAGE, stderr);
    fputs("vmandel: error: ", stderr);
    fprintf(stderr, fmt, what);
    fputc('\n', stderr);
    exit(2);
}

/* --name VALUE or --name=VALUE for each of the slots; anything else is an error. */
static void parse_options(int argc, char **argv, struct option_slot *slots, size_t count)
{
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            fputs(USAGE, stdout);
            exit(0);
        }
        if (strncmp(arg, "--", 2))
            usage_error("unexpected argument %s", arg);
        const char *eq = strchr(arg, '=');
        size_t name_length = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
        size_t k;
        for (k = 0; k < count; k++)
            if (strlen(slots[k].name) == name_length && !strncmp(arg + 2, slots[k].name, name_length))
                break;
        if (k == count)
            usage_error("unrecognized option %s", arg);
        if (eq) {
            slots[k].value = eq + 1;
        } else {
            if (i + 1 >= argc)
                usage_error("option %s expects a value", arg);
            slots[k].value = argv[++i];
        }
    }
}

static long long parse_int(const char *name, const char *text, long long min, long long max)
{
    char *end;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno || end == text || *end || value < min || value > max) {
        char what[160];
        snprintf(what, sizeof what, "--%s %s (an integer from %lld to %lld)", name, text, min, max);
        usage_error("invalid value %s", what);
    }
    return value;
}

static void parse_ipv4(const char *name, const char *text, struct in_addr *addr)
{
    if (inet_pton(AF_INET, text, addr) != 1) {
        char what[160];
        snprintf(what, sizeof what, "--%s %s (an IPv4 address)", name, text);
        usage_error("invalid value %s", what);
    }
}

/* --- the master ------------------------------------------------------------------------------------ */

enum { WORKER, IMAGE };

struct conn {
    int fd;
    int type;
    int dead; /* closed; freed at the top of the next loop pass */
    int64_t since;
    /* a worker */
    uint8_t *buffer;
    size_t length, capacity;
    int has_id;
    uint32_t id;
    int64_t row;   /* the row it computes, -1: none */
    uint64_t idle; /* its place in the queue of workers waiting for a row, 0: not waiting */
    /* an image client */
    uint8_t head[IMAGE_HEADER_SIZE];
    size_t sent, total;
    int shut;
    int64_t deadline;
};

struct tally {
    uint32_t id;
    uint32_t rows;
};

struct master {
    uint32_t width, height, iterations;
    long long expected_workers;
    uint32_t *pending; /* rows not handed out, in order: a ring of `height` */
    size_t pending_head, pending_count;
    uint8_t *done; /* per row */
    uint8_t *pixels;
    uint32_t rows_done;
    struct conn **conns;
    size_t nconns, conns_capacity;
    uint64_t idle_counter;
    struct tally *seen; /* workers that said hello, and the rows each brought */
    size_t nseen, seen_capacity;
    uint64_t reassigned;
    int started, finished;
    int64_t finished_at;
    unsigned last_tenth;
    uint16_t image_port;
};

static volatile sig_atomic_t terminate_signal;

static void on_terminate(int signal)
{
    terminate_signal = signal;
}

static void hand_out(struct master *m);

static void drop(struct master *m, struct conn *c)
{
    if (c->dead)
        return;
    c->dead = 1;
    c->idle = 0;
    close(c->fd);
    c->fd = -1;
    if (c->type == WORKER && c->row >= 0 && !m->done[c->row]) {
        uint32_t row = (uint32_t)c->row;
        if (m->pending_count < m->height) { /* always: a row is pending or held by one worker */
            m->pending_head = (m->pending_head + m->height - 1) % m->height;
            m->pending[m->pending_head] = row;
            m->pending_count++;
        }
        m->reassigned++;
        if (c->has_id)
            printf("vmandel master: worker %u gone, row %u goes to the next idle worker\n", c->id, row);
        else
            printf("vmandel master: a worker is gone, row %u goes to the next idle worker\n", row);
        hand_out(m);
    }
}

static int send_to(struct master *m, struct conn *c, const uint8_t *data, size_t length)
{
    if (send_all(c->fd, data, length) < 0) {
        drop(m, c);
        return -1;
    }
    return 0;
}

static void send_done(struct master *m, struct conn *c)
{
    uint8_t message[HEADER_SIZE];
    header(message, DONE, 0);
    send_to(m, c, message, sizeof message);
}

static struct conn *first_idle(struct master *m)
{
    struct conn *first = NULL;
    for (size_t i = 0; i < m->nconns; i++) {
        struct conn *c = m->conns[i];
        if (!c->dead && c->idle && (!first || c->idle < first->idle))
            first = c;
    }
    return first;
}

/* Give pending rows to idle workers (once started). */
static void hand_out(struct master *m)
{
    while (m->started && !m->finished) {
        struct conn *c = first_idle(m);
        if (!c)
            return;
        while (m->pending_count && m->done[m->pending[m->pending_head]]) {
            m->pending_head = (m->pending_head + 1) % m->height;
            m->pending_count--;
        }
        if (!m->pending_count)
            return;
        c->idle = 0;
        uint32_t row = m->pending[m->pending_head];
        m->pending_head = (m->pending_head + 1) % m->height;
        m->pending_count--;
        c->row = row;
        uint8_t message[HEADER_SIZE + 16];
        header(message, ROW, 16);
        put32(message + HEADER_SIZE, row);
        put32(message + HEADER_SIZE + 4, m->width);
        put32(message + HEADER_SIZE + 8, m->height);
        put32(message + HEADER_SIZE + 12, m->iterations);
        send_to(m, c, message, sizeof message); /* on failure, drop() put the row back */
    }
}

static void wants_work(struct master *m, struct conn *c)
{
    if (m->finished) {
        send_done(m, c);
    } else if (c->row < 0) { /* a worker asks for one row at a time */
        c->idle = ++m->idle_counter;
        hand_out(m);
    }
}

static void finish(struct master *m)
{
    m->finished = 1;
    m->finished_at = now_ms();
    printf("vmandel master: image complete, %u/%u rows, reassigned %llu, rows by worker", m->rows_done,
           m->height, (unsigned long long)m->reassigned);
    for (size_t i = 0; i < m->nseen; i++)
        printf(" %u:%u", m->seen[i].id, m->seen[i].rows);
    printf("; serving it on port %u\n", m->image_port);
    for (size_t i = 0; i < m->nconns; i++) { /* the idle ones; the one that sent the last row is answered by handle() */
        struct conn *c = m->conns[i];
        if (!c->dead && c->type == WORKER && c->idle) {
            c->idle = 0;
            send_done(m, c);
        }
    }
}

static struct tally *tally_of(struct master *m, uint32_t id)
{
    for (size_t i = 0; i < m->nseen; i++)
        if (m->seen[i].id == id)
            return &m->seen[i];
    return NULL;
}

/* One message from a worker; -1 if it makes no sense (the caller drops the connection). */
static int handle(struct master *m, struct conn *c, int kind, const uint8_t *payload, uint32_t length)
{
    if (kind == HELLO && length == 4 && !c->has_id) {
        c->has_id = 1;
        c->id = get32(payload);
        if (!tally_of(m, c->id)) {
            if (m->nseen == m->seen_capacity) {
                m->seen_capacity = m->seen_capacity ? 2 * m->seen_capacity : 8;
                m->seen = xrealloc(m->seen, m->seen_capacity * sizeof *m->seen);
            }
            m->seen[m->nseen].id = c->id;
            m->seen[m->nseen].rows = 0;
            m->nseen++;
        }
        if (m->finished)
            printf("vmandel master: worker %u said hello, the image is complete: DONE\n", c->id);
        else
            printf("vmandel master: worker %u said hello (%zu of %lld)\n", c->id, m->nseen, m->expected_workers);
        if (!m->started && (long long)m->nseen >= m->expected_workers) {
            m->started = 1;
            printf("vmandel master: handing out rows\n");
        }
        wants_work(m, c);
        return 0;
    }
    if (kind == RESULT && (uint64_t)length == 4 + (uint64_t)m->width && c->has_id) {
        uint32_t row = get32(payload);
        if (row >= m->height)
            return -1;
        if (c->row == (int64_t)row)
            c->row = -1;
        if (!m->done[row]) {
            m->done[row] = 1;
            memcpy(m->pixels + (size_t)row * m->width, payload + 4, m->width);
            m->rows_done++;
            tally_of(m, c->id)->rows++;
            unsigned tenth = (unsigned)((uint64_t)m->rows_done * 10 / m->height);
            if (tenth > m->last_tenth && m->rows_done < m->height) {
                m->last_tenth = tenth;
                printf("vmandel master: %u/%u rows\n", m->rows_done, m->height);
            }
        }
        if (m->rows_done == m->height && !m->finished)
            finish(m);
        if (!c->dead)
            wants_work(m, c);
        return 0;
    }
    return -1;
}

static void read_worker(struct master *m, struct conn *c)
{
    const size_t chunk = 1 << 16;
    if (c->capacity - c->length < chunk) {
        c->capacity = c->length + chunk;
        c->buffer = xrealloc(c->buffer, c->capacity);
    }
    ssize_t n;
    do
        n = recv(c->fd, c->buffer + c->length, chunk, 0);
    while (n < 0 && errno == EINTR);
    if (n <= 0) {
        drop(m, c);
        return;
    }
    c->length += (size_t)n;
    /* Like mandelbrot._parse: garbage anywhere among the complete messages drops the connection unheard. */
    size_t end = 0;
    while (c->length - end >= HEADER_SIZE) {
        uint32_t length = get32(c->buffer + end + 5);
        if (memcmp(c->buffer + end, MAGIC, 4) || length > MAX_PAYLOAD) {
            drop(m, c);
            return;
        }
        if (c->length - end < HEADER_SIZE + (size_t)length)
            break;
        end += HEADER_SIZE + (size_t)length;
    }
    for (size_t at = 0; at < end && !c->dead;) {
        uint32_t length = get32(c->buffer + at + 5);
        if (handle(m, c, c->buffer[at + 4], c->buffer + at + HEADER_SIZE, length) < 0) {
            drop(m, c);
            return;
        }
        at += HEADER_SIZE + (size_t)length;
    }
    if (c->dead)
        return;
    memmove(c->buffer, c->buffer + end, c->length - end);
    c->length -= end;
}

static struct conn *add_conn(struct master *m, int fd, int type)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return NULL;
    }
    c->fd = fd;
    c->type = type;
    c->row = -1;
    c->since = now_ms();
    if (m->nconns == m->conns_capacity) {
        m->conns_capacity = m->conns_capacity ? 2 * m->conns_capacity : 16;
        m->conns = xrealloc(m->conns, m->conns_capacity * sizeof *m->conns);
    }
    m->conns[m->nconns++] = c;
    return c;
}

static int accept_one(int listener)
{
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
        perror("vmandel master: accept");
        sleep_ms(100); /* e.g. out of descriptors: do not spin */
    }
    return fd;
}

/* Send what the socket takes; when all is out, half-close and wait for the client to hang up. */
static void write_image(struct master *m, struct conn *c)
{
    while (c->sent < c->total) {
        const uint8_t *p;
        size_t n;
        if (c->sent < IMAGE_HEADER_SIZE) {
            p = c->head + c->sent;
            n = IMAGE_HEADER_SIZE - c->sent;
        } else {
            p = m->pixels + (c->sent - IMAGE_HEADER_SIZE);
            n = c->total - c->sent;
        }
        ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                drop(m, c);
            return;
        }
        c->sent += (size_t)k;
    }
    shutdown(c->fd, SHUT_WR);
    c->shut = 1;
    c->deadline = now_ms() + IMAGE_DRAIN_MS;
}

static void accept_image(struct master *m, int listener)
{
    int fd = accept_one(listener);
    if (fd < 0)
        return;
    set_nonblocking(fd, 1);
    struct conn *c = add_conn(m, fd, IMAGE);
    if (!c)
        return;
    memcpy(c->head, IMAGE_MAGIC, 4);
    put32(c->head + 4, m->width);
    put32(c->head + 8, m->height);
    put32(c->head + 12, m->iterations);
    put32(c->head + 16, m->rows_done);
    c->total = IMAGE_HEADER_SIZE + (m->rows_done == m->height ? (size_t)m->width * m->height : 0);
    c->deadline = c->since + IMAGE_CLIENT_MS;
    write_image(m, c);
}

static void drain_image(struct master *m, struct conn *c)
{
    uint8_t scratch[4096];
    for (;;) {
        ssize_t n = recv(c->fd, scratch, sizeof scratch, MSG_DONTWAIT);
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        drop(m, c);
        return;
    }
}

static int listen_on(struct in_addr addr, int port, const char *what)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("vmandel master: socket");
        exit(1);
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr = addr;
    sa.sin_port = htons((uint16_t)port);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 64) < 0) {
        char text[INET_ADDRSTRLEN];
        fprintf(stderr, "vmandel master: cannot listen on %s:%d (%s): %s\n",
                inet_ntop(AF_INET, &addr, text, sizeof text), port, what, strerror(errno));
        exit(1);
    }
    set_nonblocking(fd, 1);
    return fd;
}

static uint16_t bound_port(int fd)
{
    struct sockaddr_in sa;
    socklen_t length = sizeof sa;
    if (getsockname(fd, (struct sockaddr *)&sa, &length) < 0)
        return 0;
    return ntohs(sa.sin_port);
}

static int run_master(int argc, char **argv)
{
    struct option_slot slots[] = {{"bind", "0.0.0.0"}, {"port", NULL},    {"width", "320"},  {"height", "240"},
                                  {"iterations", "500"}, {"workers", "1"}, {"image-port", NULL}};
    parse_options(argc, argv, slots, sizeof slots / sizeof slots[0]);
    struct in_addr addr;
    parse_ipv4("bind", slots[0].value, &addr);
    int port = slots[1].value ? (int)parse_int("port", slots[1].value, 0, 65535) : PORT;
    struct master master, *m = &master;
    memset(m, 0, sizeof *m);
    m->width = (uint32_t)parse_int("width", slots[2].value, 1, MAX_PAYLOAD - 4);
    m->height = (uint32_t)parse_int("height", slots[3].value, 1, UINT32_MAX);
    m->iterations = (uint32_t)parse_int("iterations", slots[4].value, 1, UINT32_MAX);
    m->expected_workers = parse_int("workers", slots[5].value, -(1LL << 31), 1LL << 31);
    int image_port = slots[6].value ? (int)parse_int("image-port", slots[6].value, 0, 65535) : port + 1;
    if (image_port > 65535)
        usage_error("%s", "--image-port is needed when --port is 65535");

    if ((uint64_t)m->width * m->height > SIZE_MAX / 8) { /* so the row ring (4 bytes a row) fits too */
        fprintf(stderr, "vmandel master: a %ux%u image is too large\n", m->width, m->height);
        return 1;
    }
    m->pixels = malloc((size_t)m->width * m->height);
    m->done = calloc(m->height, 1);
    m->pending = malloc((size_t)m->height * sizeof *m->pending);
    if (!m->pixels || !m->done || !m->pending) {
        fprintf(stderr, "vmandel master: not enough memory for a %ux%u image\n", m->width, m->height);
        return 1;
    }
    for (uint32_t y = 0; y < m->height; y++)
        m->pending[y] = y;
    m->pending_count = m->height;
    m->started = m->expected_workers <= 0;

    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_terminate;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);
    sigset_t blocked, unblocked;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigprocmask(SIG_BLOCK, &blocked, &unblocked); /* delivered only while in ppoll() */
    sigdelset(&unblocked, SIGTERM);
    sigdelset(&unblocked, SIGINT);

    int listener = listen_on(addr, port, "rows");
    int image_listener = listen_on(addr, image_port, "image");
    m->image_port = bound_port(image_listener);
    char text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &addr, text, sizeof text);
    printf("vmandel master: %ux%u, %u iterations, %lld workers; rows on %s:%u, image on %s:%u\n", m->width,
           m->height, m->iterations, m->expected_workers, text, bound_port(listener), text, m->image_port);
    if (m->started)
        printf("vmandel master: handing out rows\n");

    struct pollfd *fds = NULL;
    struct conn **polled = NULL;
    size_t fds_capacity = 0;
    while (!terminate_signal) {
        /* Free what was closed during the last pass (nothing holds a pointer to it any more). */
        size_t kept = 0;
        for (size_t i = 0; i < m->nconns; i++) {
            struct conn *c = m->conns[i];
            if (c->dead) {
                free(c->buffer);
                free(c);
            } else {
                m->conns[kept++] = c;
            }
        }
        m->nconns = kept;

        if (fds_capacity < m->nconns + 2) {
            fds_capacity = 2 * (m->nconns + 2);
            fds = xrealloc(fds, fds_capacity * sizeof *fds);
            polled = xrealloc(polled, fds_capacity * sizeof *polled);
        }
        int64_t now = now_ms(), deadline = -1;
        fds[0] = (struct pollfd){.fd = listener, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = image_listener, .events = POLLIN};
        size_t nfds = 2;
        for (size_t i = 0; i < m->nconns; i++) {
            struct conn *c = m->conns[i];
            int64_t due = -1;
            if (c->type == WORKER) {
                fds[nfds].events = POLLIN;
                if (m->finished)
                    due = (c->since > m->finished_at ? c->since : m->finished_at) + LINGER_MS;
            } else {
                fds[nfds].events = c->shut ? POLLIN : POLLOUT;
                due = c->deadline;
            }
            if (due >= 0 && (deadline < 0 || due < deadline))
                deadline = due;
            fds[nfds].fd = c->fd;
            fds[nfds].revents = 0;
            polled[nfds++] = c;
        }
        struct timespec timeout, *timeout_p = NULL;
        if (deadline >= 0) {
            int64_t wait = deadline > now ? deadline - now : 0;
            timeout.tv_sec = (time_t)(wait / 1000);
            timeout.tv_nsec = (long)(wait % 1000) * 1000000L;
            timeout_p = &timeout;
        }
        int ready = ppoll(fds, nfds, timeout_p, &unblocked);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("vmandel master: poll");
            return 1;
        }
        if (fds[0].revents & POLLIN) {
            int fd;
            while ((fd = accept_one(listener)) >= 0) { /* blocking: reads only after poll says so */
                tune(fd);
                add_conn(m, fd, WORKER);
            }
        }
        if (fds[1].revents & POLLIN)
            accept_image(m, image_listener);
        for (size_t i = 2; i < nfds; i++) {
            struct conn *c = polled[i];
            if (c->dead || !fds[i].revents)
                continue;
            if (c->type == WORKER)
                read_worker(m, c);
            else if (c->shut)
                drain_image(m, c);
            else if (fds[i].revents & (POLLERR | POLLHUP | POLLNVAL))
                drop(m, c);
            else
                write_image(m, c);
        }
        now = now_ms();
        for (size_t i = 0; i < m->nconns; i++) {
            struct conn *c = m->conns[i];
            if (c->dead)
                continue;
            if (c->type == WORKER && m->finished &&
                now >= (c->since > m->finished_at ? c->since : m->finished_at) + LINGER_MS)
                drop(m, c); /* the worker was told DONE (or never asked): stop waiting for it to hang up */
            else if (c->type == IMAGE && now >= c->deadline)
                drop(m, c);
        }
    }
    printf("vmandel master: terminated (signal %d), %u/%u rows\n", (int)terminate_signal, m->rows_done,
           m->height);
    return 0;
}

/* --- the worker ------------------------------------------------------------------------------------ */

/* 0 once connected (blocking again), -1 on failure or after timeout_ms. */
static int connect_within(int fd, const struct sockaddr_in *addr, int timeout_ms)
{
    if (set_nonblocking(fd, 1) < 0)
        return -1;
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        if (errno != EINPROGRESS && errno != EINTR)
            return -1;
        int64_t deadline = now_ms() + timeout_ms;
        for (;;) {
            int64_t left = deadline - now_ms();
            if (left <= 0)
                return -1;
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int ready = poll(&p, 1, (int)left);
            if (ready < 0 && errno == EINTR)
                continue;
            if (ready <= 0)
                return -1;
            break;
        }
        int error = 0;
        socklen_t length = sizeof error;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) < 0 || error)
            return -1;
    }
    return set_nonblocking(fd, 0);
}

/* A connected socket to the master, retrying for CONNECT_WINDOW_MS; -1 if it never answered. */
static int connect_master(const struct sockaddr_in *addr)
{
    int64_t deadline = now_ms() + CONNECT_WINDOW_MS;
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0) {
            if (connect_within(fd, addr, CONNECT_TIMEOUT_MS) == 0) {
                tune(fd);
                return fd;
            }
            close(fd);
        }
        if (now_ms() >= deadline)
            return -1;
        sleep_ms(RETRY_INTERVAL_MS);
    }
}

static int run_worker(int argc, char **argv)
{
    struct option_slot slots[] = {{"master", NULL}, {"id", NULL}, {"delay-ms", "0"}};
    parse_options(argc, argv, slots, sizeof slots / sizeof slots[0]);
    if (!slots[0].value || !slots[1].value)
        usage_error("%s", "the following arguments are required: --master, --id");
    const char *target = slots[0].value;
    const char *colon = strrchr(target, ':');
    if (!colon)
        usage_error("invalid value %s (IP:PORT)", target);
    char host[INET_ADDRSTRLEN + 1];
    size_t host_length = (size_t)(colon - target);
    if (host_length >= sizeof host)
        usage_error("invalid value %s (IP:PORT with an IPv4 address)", target);
    memcpy(host, target, host_length);
    host[host_length] = 0;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    parse_ipv4("master", host, &addr.sin_addr);
    addr.sin_port = htons((uint16_t)parse_int("master", colon + 1, 1, 65535));
    uint32_t id = (uint32_t)parse_int("id", slots[1].value, 0, UINT32_MAX);
    long long delay = parse_int("delay-ms", slots[2].value, -(1LL << 40), 1LL << 40);
    if (delay < 0)
        delay = 0;

    signal(SIGPIPE, SIG_IGN);
    uint8_t *message = NULL; /* the RESULT being sent: header, row, pixels */
    size_t message_capacity = 0;
    unsigned long long rows = 0;
    for (;;) { /* one connection per pass; a lost connection is retried (the master re-assigned our row) */
        int fd = connect_master(&addr);
        if (fd < 0) {
            fprintf(stderr, "vmandel worker %u: no master at %s\n", id, target);
            return 1;
        }
        printf("vmandel worker %u: connected to %s\n", id, target);
        uint8_t hello[HEADER_SIZE + 4];
        header(hello, HELLO, 4);
        put32(hello + HEADER_SIZE, id);
        if (send_all(fd, hello, sizeof hello) < 0)
            goto lost;
        for (;;) {
            uint8_t head[HEADER_SIZE], payload[16];
            if (recv_exact(fd, head, sizeof head) < 0)
                goto lost;
            uint32_t length = get32(head + 5);
            if (memcmp(head, MAGIC, 4) || length > MAX_PAYLOAD)
                goto lost; /* garbage from the master */
            if (recv_exact(fd, payload, length < 16 ? length : 16) < 0 ||
                (length > 16 && recv_exact(fd, NULL, length - 16) < 0))
                goto lost;
            if (head[4] == DONE) {
                close(fd);
                printf("vmandel worker %u: done, %llu rows\n", id, rows);
                return 0;
            }
            if (head[4] != ROW || length != 16)
                goto lost; /* unexpected message */
            uint32_t row = get32(payload), width = get32(payload + 4), height = get32(payload + 8);
            uint32_t iterations = get32(payload + 12);
            if (!(row < height && width > 0 && iterations > 0) || width > UINT32_MAX - 4) {
                fprintf(stderr, "vmandel worker %u: row %u outside a %ux%u image, or no iterations\n", id, row,
                        width, height);
                return 1;
            }
            size_t need = HEADER_SIZE + 4 + (size_t)width;
            if (need > message_capacity) {
                message = xrealloc(message, need);
                message_capacity = need;
            }
            render_row(row, width, height, iterations, message + HEADER_SIZE + 4);
            if (delay)
                sleep_ms(delay);
            header(message, RESULT, 4 + width);
            put32(message + HEADER_SIZE, row);
            if (send_all(fd, message, need) < 0)
                goto lost;
            rows++;
        }
    lost:
        close(fd);
        printf("vmandel worker %u: lost the master, reconnecting\n", id);
        sleep_ms(RETRY_INTERVAL_MS);
    }
}

/* --- render ---------------------------------------------------------------------------------------- */

static int run_render(int argc, char **argv)
{
    struct option_slot slots[] = {{"width", "320"}, {"height", "240"}, {"iterations", "500"}};
    parse_options(argc, argv, slots, sizeof slots / sizeof slots[0]);
    uint32_t width = (uint32_t)parse_int("width", slots[0].value, 1, UINT32_MAX);
    uint32_t height = (uint32_t)parse_int("height", slots[1].value, 1, UINT32_MAX);
    uint32_t iterations = (uint32_t)parse_int("iterations", slots[2].value, 1, UINT32_MAX);
    uint8_t *row = xrealloc(NULL, width);
    for (uint32_t y = 0; y < height; y++) {
        render_row(y, width, height, iterations, row);
        if (fwrite(row, 1, width, stdout) != width) {
            perror("vmandel render: stdout");
            return 1;
        }
    }
    if (fflush(stdout) != 0) {
        perror("vmandel render: stdout");
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(USAGE, stderr);
        return 2;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        fputs(USAGE, stdout);
        return 0;
    }
    if (!strcmp(argv[1], "render"))
        return run_render(argc - 2, argv + 2);
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress lines reach the console as they happen */
    if (!strcmp(argv[1], "master"))
        return run_master(argc - 2, argv + 2);
    if (!strcmp(argv[1], "worker"))
        return run_worker(argc - 2, argv + 2);
    usage_error("unknown role %s (master, worker or render)", argv[1]);
    return 2;
}
