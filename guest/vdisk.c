/*
 * vdisk: keeps writing a hash chain of numbered blocks to a disk, for the tests of VM disk snapshots.
 *
 *   vdisk /dev/vda [interval_ms]      (default interval 20 ms; waits up to 10 s for the device)
 *
 * Block k (k = 1, 2, ...) is the 512 bytes at offset 512 * k: "VDSK", then little-endian u64 k, u64 token
 * (random, drawn for this write) and u64 prev, the token of block k - 1 as this process holds it in
 * memory. Each write is O_SYNC. So a disk restored together with the guest's memory holds every block the
 * restored process believes written and none it does not: after the restore the process writes k + 1
 * with prev = its own token of k, and fresh tokens from there on. A disk taken later than the memory shows
 * up as blocks whose tokens change after the restore, one taken earlier as a chain with a hole.
 * Stops (and idles) when the disk is full. Build: gcc -static -O2 -Wall -o vdisk vdisk.c
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 512

int main(int argc, char **argv)
{
    const char *device = argc > 1 ? argv[1] : "/dev/vda";
    long interval_ms = argc > 2 ? atol(argv[2]) : 20;
    int fd = -1;
    for (int tries = 0; tries < 100 && (fd = open(device, O_RDWR | O_SYNC)) < 0; tries++)
        usleep(100000);
    if (fd < 0) {
        perror(device);
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    printf("vdisk: writing blocks to %s (%lld bytes)\n", device, (long long)size);
    fflush(stdout);
    uint64_t k = 0, prev = 0;
    unsigned char block[BLOCK];
    for (;;) {
        uint64_t token;
        if (getrandom(&token, sizeof token, 0) != sizeof token) {
            perror("vdisk: getrandom");
            return 1;
        }
        if ((off_t)(k + 2) * BLOCK > size) {
            printf("vdisk: disk full at block %llu\n", (unsigned long long)k);
            fflush(stdout);
            for (;;)
                pause();
        }
        k++;
        memset(block, 0, sizeof block);
        memcpy(block, "VDSK", 4);
        memcpy(block + 8, &k, 8);
        memcpy(block + 16, &token, 8);
        memcpy(block + 24, &prev, 8);
        if (pwrite(fd, block, BLOCK, (off_t)k * BLOCK) != BLOCK) {
            perror("vdisk: write");
            return 1;
        }
        prev = token;
        struct timespec pause_for = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
        nanosleep(&pause_for, NULL);
    }
}
