"""Builds `datapath._writepath`, the native part of a guest's write path: receiving NBD write requests
(datapath/nbd.py) and appending their replication log records (datapath/logformat.py); and the data path's
chunk hashes (datapath/manifest.py), computed without holding the GIL.

Why native: at 64 KiB a request, the Python around each one (parsing its header, slicing, building the
record header, the checksum calls, the log state of each record, the reply) cost about as much server CPU
as the data movement itself, which left the tracker service at 0.4-0.9x qemu-nbd's throughput. Here a
call receives every write request already in the socket (blocking for the first only), and another logs
a whole batch: record headers, checksums, the log digest chain and one pwritev, each call without the GIL.
Measured on the 2-core development machine (shared, load about 4; benchmarks/nbd.py's method, old and new
service alternating with qemu-nbd in one run): server CPU per 64 KiB write 43-47 us against 52-66 before
(qemu-nbd 26-35), 0.71x qemu-nbd's throughput against 0.61x; 1 MiB writes unchanged (0.9x, both). What is
left: the service's connection thread is CPU-bound at 64 KiB (88% of a core over a run, two thirds of it in
the kernel: the socket's copy, the log's, the disk's), where qemu-nbd's writes run on its thread pool across
both cores; with a spare log big enough for a whole 1 GiB run it reaches 0.66-0.68x, so the pages the log
allocates past the spare are not what is left. A second thread per connection writing the disk behind the
log's commit was tried (2026-12-05) and not kept: replying after the disk write gained nothing (the logging
thread stayed the slow stage, and each hand-off cost thread wake-ups); replying at the commit gained about
10% at 64 KiB and lost 10-20% at 1 MiB (one write per batch, a hand-off each).

Why the chunk hashes too: the `mmh3` package holds the GIL while it hashes, so a thread hashing a window
stalled the read-ahead thread's decryption of the next (each XTS call gives the GIL up and then waits up to
the 5 ms switch interval for it back): a replica's rehash after a log apply ran decryption and hashing one
after the other, and the encrypted log apply took 1.5x the time in clear. Measured here, one thread
decrypting 256 MiB while another hashed 256 MiB: 0.075 s with mmh3, 0.051 s with this one (alone 0.046 and
0.036 s).

Byte for byte the same as the Python it replaces, which stays the reference (tests/test_writepath.py
compares them): the checksum is MurmurHash3_x64_128 with seed 0 (Austin Appleby's, public domain, as
the `mmh3` package computes it), its 16 bytes h1 then h2, little endian.

Built at install time by cffi's setuptools hook (setup.py: `cffi_modules`), in API mode, like
sites/storage/xts_build.py; it needs only libc.
"""
from __future__ import annotations

import cffi

ffibuilder = cffi.FFI()
ffibuilder.cdef("""
struct asr_nbd_request {
    uint64_t handle;
    uint64_t offset;
    uint32_t length;
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
};
int asr_nbd_receive_writes(int fd, uint64_t export_size, uint32_t max_payload, size_t batch_bytes,
                           unsigned char **buffers, int capacity, struct asr_nbd_request *requests, int *status);
int asr_nbd_send_replies(int fd, const struct asr_nbd_request *requests, int count, uint32_t error);
void asr_mmh3_x64_128(const unsigned char *data, size_t length, unsigned char *digest);
void asr_mmh3_chunks(const unsigned char *data, size_t length, size_t chunk_size, unsigned char *digests);
int asr_log_append(int fd, int64_t position, uint64_t next_seq, unsigned char *digest, int count,
                   const uint64_t *offsets, const uint32_t *lengths, unsigned char **data, unsigned char *checksums);
""")
ffibuilder.set_source("datapath._writepath", r"""
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- MurmurHash3_x64_128 (seed 0), streaming over the parts of a record ------------------------------ */
#define C1 0x87c37b91114253d5ULL
#define C2 0x4cf5ad432745937fULL

struct asr_mmh3 {
    uint64_t h1, h2;
    unsigned char tail[16];
    size_t tail_length;
    size_t total;
};

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void store64(unsigned char *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static inline void mmh3_block(struct asr_mmh3 *s, const unsigned char *block) {
    uint64_t k1 = load64(block), k2 = load64(block + 8), h1 = s->h1, h2 = s->h2;
    k1 *= C1; k1 = rotl64(k1, 31); k1 *= C2; h1 ^= k1;
    h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
    k2 *= C2; k2 = rotl64(k2, 33); k2 *= C1; h2 ^= k2;
    h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
    s->h1 = h1;
    s->h2 = h2;
}

static void mmh3_init(struct asr_mmh3 *s) { memset(s, 0, sizeof *s); }

static void mmh3_update(struct asr_mmh3 *s, const unsigned char *data, size_t length) {
    s->total += length;
    if (s->tail_length) {
        size_t take = 16 - s->tail_length < length ? 16 - s->tail_length : length;
        memcpy(s->tail + s->tail_length, data, take);
        s->tail_length += take;
        data += take;
        length -= take;
        if (s->tail_length < 16)
            return;
        mmh3_block(s, s->tail);
        s->tail_length = 0;
    }
    for (; length >= 16; data += 16, length -= 16)
        mmh3_block(s, data);
    memcpy(s->tail, data, length);
    s->tail_length = length;
}

static void mmh3_final(struct asr_mmh3 *s, unsigned char *digest) {
    const unsigned char *tail = s->tail;
    uint64_t k1 = 0, k2 = 0, h1 = s->h1, h2 = s->h2;
    switch (s->tail_length) {
    case 15: k2 ^= (uint64_t)tail[14] << 48; /* fall through */
    case 14: k2 ^= (uint64_t)tail[13] << 40; /* fall through */
    case 13: k2 ^= (uint64_t)tail[12] << 32; /* fall through */
    case 12: k2 ^= (uint64_t)tail[11] << 24; /* fall through */
    case 11: k2 ^= (uint64_t)tail[10] << 16; /* fall through */
    case 10: k2 ^= (uint64_t)tail[9] << 8; /* fall through */
    case 9: k2 ^= (uint64_t)tail[8];
        k2 *= C2; k2 = rotl64(k2, 33); k2 *= C1; h2 ^= k2;
        /* fall through */
    case 8: k1 ^= (uint64_t)tail[7] << 56; /* fall through */
    case 7: k1 ^= (uint64_t)tail[6] << 48; /* fall through */
    case 6: k1 ^= (uint64_t)tail[5] << 40; /* fall through */
    case 5: k1 ^= (uint64_t)tail[4] << 32; /* fall through */
    case 4: k1 ^= (uint64_t)tail[3] << 24; /* fall through */
    case 3: k1 ^= (uint64_t)tail[2] << 16; /* fall through */
    case 2: k1 ^= (uint64_t)tail[1] << 8; /* fall through */
    case 1: k1 ^= (uint64_t)tail[0];
        k1 *= C1; k1 = rotl64(k1, 31); k1 *= C2; h1 ^= k1;
    }
    h1 ^= (uint64_t)s->total;
    h2 ^= (uint64_t)s->total;
    h1 += h2;
    h2 += h1;
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 += h2;
    h2 += h1;
    store64(digest, h1);
    store64(digest + 8, h2);
}

/* mmh3.mmh3_x64_128_digest(data) */
static void asr_mmh3_x64_128(const unsigned char *data, size_t length, unsigned char *digest) {
    struct asr_mmh3 s;
    mmh3_init(&s);
    mmh3_update(&s, data, length);
    mmh3_final(&s, digest);
}

/* The digest of each `chunk_size` bytes of `data` (the last piece may be shorter), 16 bytes each, in order:
   a manifest's chunk hashes, without the GIL (the mmh3 package holds it while it hashes). */
static void asr_mmh3_chunks(const unsigned char *data, size_t length, size_t chunk_size, unsigned char *digests) {
    for (size_t done = 0; done < length; done += chunk_size, digests += 16)
        asr_mmh3_x64_128(data + done, length - done < chunk_size ? length - done : chunk_size, digests);
}

/* ---- replication log records (docs/formats.md) -------------------------------------------------------- */
#define RECORD_HEADER_SIZE 24
#define CHECKSUM_SIZE 16
#define RECORD_WRITE 1
#define IOV_BATCH 1020 /* three buffers a record, under Linux's IOV_MAX of 1024 */

static int write_fully(int fd, struct iovec *iov, int count, int64_t position) {
    while (count > 0) {
        ssize_t written = pwritev(fd, iov, count, position);
        if (written < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        position += written;
        while (count > 0 && (size_t)written >= iov->iov_len) {
            written -= iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0 && written) {
            iov->iov_base = (unsigned char *)iov->iov_base + written;
            iov->iov_len -= written;
        }
    }
    return 0;
}

/* The checksums of records a and b (header, then data of a multiple of 16 bytes, at least 16) computed
   together: MurmurHash3 is a chain of dependent multiplications, so two records' blocks interleaved keep
   the CPU busy where one leaves it waiting (measured: 4.5 us a 64 KiB record instead of 6.9). The stream
   of a record is its 24-byte header then its data: two blocks of header (the second with the data's first
   8 bytes), then the data from byte 8 in blocks, then its last 8 bytes as the tail. */
#define MMH3_ROUND(h1, h2, p) do { \
        uint64_t k1_ = load64(p), k2_ = load64((p) + 8); \
        k1_ *= C1; k1_ = rotl64(k1_, 31); k1_ *= C2; h1 ^= k1_; \
        h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729; \
        k2_ *= C2; k2_ = rotl64(k2_, 33); k2_ *= C1; h2 ^= k2_; \
        h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5; \
    } while (0)

struct record_hash {
    const unsigned char *header, *data;
    size_t length;
    unsigned char *checksum;
    struct asr_mmh3 s;
};

static void record_hash_start(struct record_hash *r) {
    unsigned char second[16];
    mmh3_init(&r->s);
    mmh3_block(&r->s, r->header);
    memcpy(second, r->header + 16, 8);
    memcpy(second + 8, r->data, 8);
    mmh3_block(&r->s, second);
}

static void record_hash_finish(struct record_hash *r, size_t blocks_done) {
    struct asr_mmh3 *s = &r->s;
    const unsigned char *body = r->data + 8;
    size_t blocks = r->length / 16 - 1;
    for (; blocks_done < blocks; blocks_done++)
        mmh3_block(s, body + blocks_done * 16);
    memcpy(s->tail, r->data + r->length - 8, 8);
    s->tail_length = 8;
    s->total = RECORD_HEADER_SIZE + r->length;
    mmh3_final(s, r->checksum);
}

static void record_hash_pair(struct record_hash *a, struct record_hash *b) {
    size_t common = (a->length < b->length ? a->length : b->length) / 16 - 1, i;
    const unsigned char *pa = a->data + 8, *pb = b->data + 8;
    uint64_t a1, a2, b1, b2;
    record_hash_start(a);
    record_hash_start(b);
    a1 = a->s.h1; a2 = a->s.h2; b1 = b->s.h1; b2 = b->s.h2;
    for (i = 0; i < common; i++, pa += 16, pb += 16) {
        MMH3_ROUND(a1, a2, pa);
        MMH3_ROUND(b1, b2, pb);
    }
    a->s.h1 = a1; a->s.h2 = a2; b->s.h1 = b1; b->s.h2 = b2;
    record_hash_finish(a, common);
    record_hash_finish(b, common);
}

static void record_hash_alone(struct record_hash *r) {
    if (r->length >= 16 && r->length % 16 == 0) {
        record_hash_start(r);
        record_hash_finish(r, 0);
    } else {
        mmh3_init(&r->s);
        mmh3_update(&r->s, r->header, RECORD_HEADER_SIZE);
        mmh3_update(&r->s, r->data, r->length);
        mmh3_final(&r->s, r->checksum);
    }
}

/* Append `count` WRITE records (data[i] of lengths[i] bytes at disk offset offsets[i]) at `position`,
   sequence numbers from `next_seq`: each record's header, data and checksum (into checksums, 16 bytes a
   record), and `digest` (16 bytes) chained over each checksum as log_digest_step does. 0, or -errno of
   the failed write (then `digest` is unchanged). */
static int asr_log_append(int fd, int64_t position, uint64_t next_seq, unsigned char *digest, int count,
                          const uint64_t *offsets, const uint32_t *lengths, unsigned char **data,
                          unsigned char *checksums) {
    unsigned char headers[IOV_BATCH / 3][RECORD_HEADER_SIZE];
    struct iovec iov[IOV_BATCH];
    unsigned char chain[2 * CHECKSUM_SIZE];
    struct record_hash pending;
    int i = 0;
    memcpy(chain, digest, CHECKSUM_SIZE);
    while (i < count) {
        int n = 0, first = i, result, waiting = 0;
        int64_t start = position;
        for (; i < count && n < IOV_BATCH; i++, n += 3) {
            unsigned char *header = headers[n / 3], *checksum = checksums + (size_t)i * CHECKSUM_SIZE;
            struct record_hash r;
            uint32_t type = RECORD_WRITE, length = lengths[i];
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
            type = __builtin_bswap32(type);
            length = __builtin_bswap32(length);
#endif
            memcpy(header, &type, 4);
            memcpy(header + 4, &length, 4);
            store64(header + 8, next_seq + (uint64_t)i);
            store64(header + 16, offsets[i]);
            r.header = header;
            r.data = data[i];
            r.length = lengths[i];
            r.checksum = checksum;
            if (r.length < 16 || r.length % 16) {
                record_hash_alone(&r);
            } else if (waiting) {
                record_hash_pair(&pending, &r);
                waiting = 0;
            } else {
                pending = r;
                waiting = 1;
            }
            iov[n].iov_base = header;
            iov[n].iov_len = RECORD_HEADER_SIZE;
            iov[n + 1].iov_base = data[i];
            iov[n + 1].iov_len = lengths[i];
            iov[n + 2].iov_base = checksum;
            iov[n + 2].iov_len = CHECKSUM_SIZE;
            position += RECORD_HEADER_SIZE + (int64_t)lengths[i] + CHECKSUM_SIZE;
        }
        if (waiting)
            record_hash_alone(&pending);
        for (; first < i; first++) {
            memcpy(chain + CHECKSUM_SIZE, checksums + (size_t)first * CHECKSUM_SIZE, CHECKSUM_SIZE);
            asr_mmh3_x64_128(chain, sizeof chain, chain);
        }
        if ((result = write_fully(fd, iov, n, start)) < 0)
            return result;
    }
    memcpy(digest, chain, CHECKSUM_SIZE);
    return 0;
}

/* ---- NBD requests (datapath/nbd.py) -------------------------------------------------------------------- */
#define REQUEST_MAGIC 0x25609513U
#define SIMPLE_REPLY_MAGIC 0x67446698U
#define REQUEST_SIZE 28
#define CMD_WRITE 1
#define SECTOR 512
#define STATUS_WAITING 0
#define STATUS_OTHER 1
#define STATUS_END 2
#define MAX_REPLIES 64

struct asr_nbd_request {
    uint64_t handle;
    uint64_t offset;
    uint32_t length;
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
};

static inline uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const unsigned char *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static inline uint16_t be16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* Receive exactly `length` bytes, blocking; `done` of them may be there already. 0, 1 at end of stream
   (even within), or -errno. */
static int receive_rest(int fd, unsigned char *target, size_t length, size_t done) {
    while (done < length) {
        ssize_t n = recv(fd, target + done, length - done, 0);
        if (n == 0)
            return 1;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += n;
    }
    return 0;
}
/* Receive the WRITE requests a client has sent, each payload into buffers[i] (of max_payload bytes): the
   first request is waited for, the next ones taken while their header is already in the socket, up to
   `capacity` writes or once `batch_bytes` of payload are taken. Returns how many writes were received
   whole (their headers in requests[0..n)), and in *status why it stopped:
   0: no further request had arrived yet, or the batch is full;
   1: requests[n] holds the header of a request that is not a write to serve here (another command, a
      bad magic, a write outside the export, unaligned or longer than max_payload): its payload unread;
   2: end of stream (the client closed, or the server shut the socket down), maybe within a request;
   -errno: receiving failed. */
static int asr_nbd_receive_writes(int fd, uint64_t export_size, uint32_t max_payload, size_t batch_bytes,
                                  unsigned char **buffers, int capacity, struct asr_nbd_request *requests,
                                  int *status) {
    int n = 0;
    size_t taken = 0;
    for (;;) {
        unsigned char raw[REQUEST_SIZE];
        struct asr_nbd_request *request = &requests[n];
        size_t done = 0;
        int result;
        if (n > 0) {
            ssize_t got;
            if (n >= capacity || taken >= batch_bytes) {
                *status = STATUS_WAITING;
                return n;
            }
            do
                got = recv(fd, raw, REQUEST_SIZE, MSG_DONTWAIT);
            while (got < 0 && errno == EINTR);
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                *status = STATUS_WAITING;
                return n;
            }
            if (got < 0) {
                *status = -errno;
                return n;
            }
            if (got == 0) {
                *status = STATUS_END;
                return n;
            }
            done = (size_t)got;
        }
        if ((result = receive_rest(fd, raw, REQUEST_SIZE, done)) != 0) {
            *status = result > 0 ? STATUS_END : result;
            return n;
        }
        request->magic = be32(raw);
        request->flags = be16(raw + 4);
        request->type = be16(raw + 6);
        request->handle = be64(raw + 8);
        request->offset = be64(raw + 16);
        request->length = be32(raw + 24);
        if (request->magic != REQUEST_MAGIC || request->type != CMD_WRITE || request->length > max_payload
                || request->length == 0 || request->length % SECTOR || request->offset % SECTOR
                || request->offset > export_size || request->length > export_size - request->offset) {
            *status = STATUS_OTHER;
            return n;
        }
        if ((result = receive_rest(fd, buffers[n], request->length, 0)) != 0) {
            *status = result > 0 ? STATUS_END : result;
            return n;
        }
        taken += request->length;
        n++;
    }
}

/* The simple replies of requests[0..count) with `error`, in one send. 0 or -errno. */
static int asr_nbd_send_replies(int fd, const struct asr_nbd_request *requests, int count, uint32_t error) {
    unsigned char replies[MAX_REPLIES * 16];
    while (count > 0) {
        int n = count < MAX_REPLIES ? count : MAX_REPLIES, i;
        size_t sent = 0, total = (size_t)n * 16;
        for (i = 0; i < n; i++) {
            unsigned char *reply = replies + i * 16;
            uint32_t magic = __builtin_bswap32(SIMPLE_REPLY_MAGIC), code = __builtin_bswap32(error);
            uint64_t handle = __builtin_bswap64(requests[i].handle);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
            magic = SIMPLE_REPLY_MAGIC; code = error; handle = requests[i].handle;
#endif
            memcpy(reply, &magic, 4);
            memcpy(reply + 4, &code, 4);
            memcpy(reply + 8, &handle, 8);
        }
        while (sent < total) {
            ssize_t k = send(fd, replies + sent, total - sent, MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            sent += k;
        }
        requests += n;
        count -= n;
    }
    return 0;
}
""", extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
