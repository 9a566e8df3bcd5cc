/* violin-snapshot: CRIU's action script as a small static program (hostside/backends/handover.py).
 *
 * CRIU runs its action script for every action, three of them (network-lock, post-dump, network-unlock)
 * while the member's tasks are frozen: each run is a fork and exec inside the pause. This program does
 * what criu.HOOK does in bash, without the interpreter: any action but pre-dump and post-dump exits 0
 * at once; at those two it writes "predump" (the tasks still run: the helper prepares the cut) or
 * "frozen" (they are frozen: the cut) to the FIFO "request" beside the path it was run by (argv[0], a
 * symlink in the hand-over's private directory), waits up to VIOLIN_HOOK_TIMEOUT_S for a line on
 * "reply" and exits 0 only if that line is "ok" (else CRIU fails the dump and lets the tasks run). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef VIOLIN_HOOK_TIMEOUT_S
#define VIOLIN_HOOK_TIMEOUT_S 10
#endif

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

int main(int argc, char **argv)
{
	const char *action = getenv("CRTOOLS_SCRIPT_ACTION");
	char dir[4096], path[4200], answer[16];
	char *slash;
	int request, reply;
	long deadline;
	const char *line;
	ssize_t got = 0;

	if (action && !strcmp(action, "post-dump"))
		line = "frozen\n";
	else if (action && !strcmp(action, "pre-dump"))
		line = "predump\n";
	else
		return 0;
	if (argc < 1 || strlen(argv[0]) >= sizeof(dir))
		return 1;
	strcpy(dir, argv[0]);
	slash = strrchr(dir, '/');
	if (!slash)
		return 1;
	*slash = '\0';
	/* Both read-write, as the bash hook does: neither open blocks whoever is (or is not) at the other end. */
	snprintf(path, sizeof(path), "%s/request", dir);
	request = open(path, O_RDWR);
	snprintf(path, sizeof(path), "%s/reply", dir);
	reply = open(path, O_RDWR);
	if (request < 0 || reply < 0)
		return 1;
	if (write(request, line, strlen(line)) != (ssize_t)strlen(line))
		return 1;
	deadline = now_ms() + VIOLIN_HOOK_TIMEOUT_S * 1000L;
	while (got < (ssize_t)sizeof(answer) - 1 && !memchr(answer, '\n', got)) {
		struct pollfd wait = { .fd = reply, .events = POLLIN };
		long left = deadline - now_ms();
		ssize_t n;

		if (left <= 0)
			return 1;
		if (poll(&wait, 1, (int)left) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (!(wait.revents & POLLIN))
			continue;
		n = read(reply, answer + got, sizeof(answer) - 1 - got);
		if (n <= 0)
			return 1;
		got += n;
	}
	return got >= 3 && !memcmp(answer, "ok\n", 3) ? 0 : 1;
}
