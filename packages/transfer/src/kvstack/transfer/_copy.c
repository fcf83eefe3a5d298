/* kvstack.transfer's native data path: many (address, length) host ranges per call.
 *
 *   kvstack_copy_ranges  copy ranges to ranges, shared by bytes with parked helper threads
 *   kvstack_copy_pages   check a page batch's columns against both segments, then copy it
 *   kvstack_copy_route   kvstack_copy_pages on a remembered shm route, its owner checked meanwhile
 *   kvstack_plan_pages   check them, and lay out a tcp page batch's frames
 *   kvstack_check_wire   check a received tcp frame's range table against a segment
 *   kvstack_serve_frame  serve one tcp READ, WRITE, READV or WRITEV frame of a known segment
 *   kvstack_send_parallel send one frame on each of several sockets at once
 *   kvstack_send_pages   check a tcp page WRITE, lay out its frames and send them at once
 *   kvstack_await_replies take a tcp connection's replies to armed requests (client side)
 *   kvstack_wait_slot    wait for an armed request's reply (or its failure)
 *   kvstack_lane_call    send one small tcp request and take its reply (client side)
 *   kvstack_hash_ranges  KVH-64 digest of each range, copying it on the way if asked
 *   kvstack_send_ranges  send ranges on a socket (one tcp frame's pages)
 *   kvstack_recv_ranges  receive into ranges from a socket
 *
 * Built on first use by _native.py and called through ctypes, which releases the GIL for the
 * whole call. Issue #3: a batch of 256 scattered 16 KiB pages cost one ctypes.memmove (shm) or
 * one memoryview plus Python bookkeeping (tcp) per page, each taking the GIL again, so on 16
 * cores page batches waited for the GIL instead of moving bytes.
 *
 * Callers check every range against its segment first: nothing here checks bounds.
 */
#define _POSIX_C_SOURCE 200809L /* MSG_NOSIGNAL, pthread_sigmask; builds under -std=c11 too */
#define _DEFAULT_SOURCE        /* syscall (futex) */
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__)
#include <emmintrin.h> /* SSE2: every x86-64 has it */
#endif

/* A polling loop's pause: lets the core's sibling run and saves power while it spins. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__)
    _mm_pause();
#endif
}

/* ---- runs: ranges that continue each other on both sides go out as one memmove ----------- */

struct run {
    char *dst;
    const char *src;
    size_t len;
    int stream;
    int streamed; /* streaming stores were issued: fence them before reporting the copy done */
};

/* Streaming (non-temporal) stores from this many bytes of a run, when asked for: the copy
 * writes memory without first reading the destination's lines into the cache. For bytes this
 * process will not read again (a put into a store node's segment, a WRITE into a peer's
 * segment): 1 MiB into a cold shm mapping took 39-41 us this way, 50-58 us with memcpy (2-core
 * CI box). Issue #3's page batch (256 scattered 16 KiB pages right after a 64 MiB copy, 8
 * pinned threads in C, H200 host): 59-82 us this way, 98-111 with memcpy per page. */
#define STREAM_MIN (4 << 10)

static void copy_stream(char *dst, const char *src, size_t len)
{
#if defined(__x86_64__)
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15; /* streaming stores need 16-byte alignment */
    memcpy(dst, src, head);
    dst += head;
    src += head;
    len -= head;
    size_t body = len & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + body, src + body, len - body);
#else
    memcpy(dst, src, len);
#endif
}

/* After streaming stores: they are visible before whatever the caller does next (a commit,
 * a reply). Once per chunk, not per run: a fence per 16 KiB page costs. */
static void stream_fence(const struct run *run)
{
#if defined(__x86_64__)
    if (run->streamed)
        _mm_sfence();
#else
    (void)run;
#endif
}

static void run_flush(struct run *run)
{
    if (run->len == 0)
        return;
    int apart = run->dst + run->len <= run->src || run->src + run->len <= run->dst;
    if (run->stream && apart && run->len >= STREAM_MIN) {
        copy_stream(run->dst, run->src, run->len);
        run->streamed = 1;
    } else
        /* memmove, not memcpy: a range whose source and destination overlap (two mappings of
         * one shm file) stays as defined as it was with ctypes.memmove. Same speed otherwise. */
        memmove(run->dst, run->src, run->len);
    run->len = 0;
}

static void run_add(struct run *run, char *dst, const char *src, size_t len)
{
    if (len == 0)
        return;
    if (run->len && dst == run->dst + run->len && src == run->src + run->len) {
        run->len += len;
        return;
    }
    run_flush(run);
    run->dst = dst;
    run->src = src;
    run->len = len;
}

/* ---- copies ---------------------------------------------------------------------------- */

/* Bounds the helper table; the Python side asks for at most 8 copy threads by default
 * (_memory._NATIVE_THREADS, up to 64 by KVSTACK_TRANSFER_COPY_THREADS), 16 hash threads. */
#define MAX_THREADS 64
/* Chunks per thread, taken first come first served: a helper that wakes late (or shares its
 * core with another process) takes fewer instead of holding the rest back. */
#define CHUNKS_PER_THREAD 4
/* ...and no chunk bigger than this: 64 MiB on 2 threads (2-core CI box, two runs) ran at
 * 17.5-18.2 GB/s in 8 MiB chunks, 18.7-19.7 GB/s in 256 KiB ones (64 KiB: 18.3-18.9). */
#define MAX_CHUNK_BYTES (256 << 10)
/* Chunk boundaries fall on multiples of this many bytes of the batch's byte stream. */
#define CHUNK_ALIGN 4096
/* The last 1/TAPER_SHARE of a copy's bytes goes in chunks TAPER_SPLIT times smaller, so the
 * threads finish together: the job ends when its last chunk does. */
#define TAPER_SHARE 4
#define TAPER_SPLIT 4

struct job {
    void (*take)(struct job *job); /* what a thread in the job runs: take_chunks, take_blocks */
    const int64_t *dsts;
    const int64_t *srcs;
    const int64_t *lengths;
    int64_t n;
    const int64_t *starts; /* starts[i]: bytes before range i; starts[n] = total */
    int64_t total;
    int64_t chunk_bytes;
    int64_t chunks;
    int64_t next; /* next chunk to take (atomic) */
    int joined;   /* helpers that took part (under pool_lock) */
    int stream;   /* streaming stores for long runs (see copy_stream) */
    /* kvstack_hash_ranges only: units are hash blocks, starts[] counts blocks, not bytes */
    uint64_t *sums; /* per range: the sum of its blocks' terms (atomic adds) */
    /* kvstack_send_parallel only: units are sockets (SEND_UNIT int64s each) */
    int64_t *sends;
    int64_t deadline_ns;
    /* Run by the caller once the helpers are woken, before it copies (kvstack_copy_route). */
    void (*aside)(void *);
    void *aside_arg;
    /* take_chunks: chunks 0 .. big_chunks - 1 are chunk_bytes each and end at taper_at; the
     * rest are small_bytes each (see TAPER). */
    int64_t big_chunks;
    int64_t taper_at;
    int64_t small_bytes;
};

/* Copy bytes [lo, hi) of the batch's byte stream (range i holds bytes starts[i]..starts[i+1]). */
static void copy_bytes(const struct job *job, int64_t lo, int64_t hi)
{
    /* The last range that starts at or before lo (binary search; empty ranges are skipped). */
    int64_t a = 0, b = job->n - 1;
    while (a < b) {
        int64_t mid = a + (b - a + 1) / 2;
        if (job->starts[mid] <= lo)
            a = mid;
        else
            b = mid - 1;
    }
    struct run run = {NULL, NULL, 0, job->stream, 0};
    for (int64_t i = a; i < job->n && job->starts[i] < hi; i++) {
        int64_t begin = job->starts[i] > lo ? job->starts[i] : lo;
        int64_t end = job->starts[i + 1] < hi ? job->starts[i + 1] : hi;
        if (end <= begin)
            continue;
        int64_t skip = begin - job->starts[i];
        run_add(&run, (char *)(intptr_t)job->dsts[i] + skip,
                (const char *)(intptr_t)job->srcs[i] + skip, (size_t)(end - begin));
    }
    run_flush(&run);
    stream_fence(&run);
}

static void take_chunks(struct job *job)
{
    for (;;) {
        int64_t k = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (k >= job->chunks)
            return;
        int64_t lo = k * job->chunk_bytes, size = job->chunk_bytes;
        if (k >= job->big_chunks) {
            lo = job->taper_at + (k - job->big_chunks) * job->small_bytes;
            size = job->small_bytes;
        }
        int64_t hi = lo + size < job->total ? lo + size : job->total;
        copy_bytes(job, lo, hi);
    }
}

static void copy_alone(const int64_t *dsts, const int64_t *srcs, const int64_t *lengths, int64_t n,
                       int stream)
{
    struct run run = {NULL, NULL, 0, stream, 0};
    for (int64_t i = 0; i < n; i++)
        run_add(&run, (char *)(intptr_t)dsts[i], (const char *)(intptr_t)srcs[i],
                (size_t)lengths[i]);
    run_flush(&run);
    stream_fence(&run);
}

/* The helper threads: started on first need, then parked on a semaphore each between calls.
 * Starting threads per call cost 30 us each on the 2-core CI box (7 threads: 216 us, about
 * what a whole 4 MiB page batch should take); waking a parked one costs ~5 us.
 *
 * Wake-ups fan out: the caller posts the first WAKE_FANOUT helpers, and helper i, once awake,
 * posts helpers (i + 1) * WAKE_FANOUT ... + WAKE_FANOUT - 1 before it works. One thread posting
 * all 15 of a 1 MiB hash (a futex call each) started working only after the others could have
 * done the job; this way no thread posts more than WAKE_FANOUT.
 *
 * One call at a time owns the pool (`busy`); a call that finds it busy copies on its own
 * thread. `current` is the job helpers may join, NULL once its caller has taken the last
 * chunk: a helper that wakes late finds it NULL and parks again, so the caller waits only for
 * helpers that joined (`inside`), and the job on its stack outlives all of them.
 *
 * Helpers join and leave without the lock: a helper counts itself `inside` before it reads
 * `current`, and the caller clears `current` before it reads `inside` (sequentially consistent
 * atomics: one of them sees the other). Through pool_lock, the helpers of a page batch joined
 * 8-32 us after its start, one after another, and its caller noticed the last one leave 11-25
 * us late (a futex wake-up each, H200 machine). */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t pool_lock;
static pthread_cond_t pool_done;
static sem_t wake[MAX_THREADS];
#define WAKE_FANOUT 4
static int64_t helper_spin_ns; /* see kvstack_set_helper_spin */
static int helpers; /* started so far */
static int waking;  /* helpers the current job wakes (its fan-out posts stay below this) */
static int busy;    /* a call owns the pool */
static int inside;  /* helpers inside `current` */
static struct job *current;
static uint64_t generation; /* counts jobs: a helper joins each one once */

static void pool_reset(void)
{
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_done, NULL);
    for (int i = 0; i < MAX_THREADS; i++)
        sem_init(&wake[i], 0, 0);
    helpers = busy = inside = 0;
    current = NULL;
}

/* A forked child has only the thread that forked: no helpers, and maybe the lock or the job
 * of a parent thread that does not exist there. It starts over. */
static void pool_init(void)
{
    pool_reset();
    pthread_atfork(NULL, NULL, pool_reset);
}

/* Post helpers first .. first + WAKE_FANOUT - 1 that are below `limit`. */
static void wake_range(int first, int limit)
{
    for (int i = first; i < first + WAKE_FANOUT && i < limit; i++)
        sem_post(&wake[i]);
}

/* How long a helper that just worked polls for the next job before it parks on its
 * semaphore (0: it parks at once). Waking a parked helper takes a futex call and, on a VM
 * whose idle vCPU halted, an interrupt to another CPU: tens of microseconds on the GPU
 * machines, in every copy that follows a pause (issue 3: a page batch right after a 64 MiB
 * write; issue 4: each 1 MiB put). Bursts of copies, a KV handoff's or a put loop's, find
 * their helpers still polling. Set from Python by the number of usable cores. */
void kvstack_set_helper_spin(int64_t ns)
{
    __atomic_store_n(&helper_spin_ns, ns > 0 ? ns : 0, __ATOMIC_RELAXED);
}

static int64_t now_ns(void);

/* Poll up to helper_spin_ns for a job that helper `index` should join; 1 if one came. Posts
 * left over from jobs it joined by polling are taken first, so they do not wake it again. */
static int poll_for_job(sem_t *own, int index, uint64_t last)
{
    int64_t spin = __atomic_load_n(&helper_spin_ns, __ATOMIC_RELAXED);
    if (spin <= 0)
        return 0;
    while (sem_trywait(own) == 0) {
    }
    int64_t until = now_ns() + spin;
    for (unsigned k = 1;; k++) {
        if (__atomic_load_n(&generation, __ATOMIC_ACQUIRE) != last &&
            __atomic_load_n(&current, __ATOMIC_ACQUIRE) != NULL &&
            index < __atomic_load_n(&waking, __ATOMIC_RELAXED))
            return 1;
        cpu_relax();
        if (k % 64 == 0 && now_ns() >= until)
            return 0;
    }
}

/* A helper is out of `current`: the last one out wakes a caller waiting on pool_done. */
static void leave_job(void)
{
    if (__atomic_sub_fetch(&inside, 1, __ATOMIC_SEQ_CST) == 0) {
        pthread_mutex_lock(&pool_lock);
        pthread_cond_signal(&pool_done);
        pthread_mutex_unlock(&pool_lock);
    }
}

static void *helper(void *arg)
{
    sem_t *own = arg;
    int index = (int)(own - wake);
#if defined(__linux__)
    prctl(PR_SET_NAME, "kvstack-copy"); /* how top -H and /proc name the copier's threads */
#endif
    uint64_t last = 0; /* the generation this helper joined last */
    int worked = 0;    /* poll before parking only after work: an idle process stays idle */
    for (;;) {
        if (!worked || !poll_for_job(own, index, last)) {
            while (sem_wait(own) != 0) {
            } /* EINTR: wait again */
        }
        worked = 0;
        /* A post left over from a job this helper woke too late for can wake it during a
         * later one it has already helped with: join each job once. A job wanting fewer
         * helpers than this one's index is not its to join. */
        uint64_t seen = __atomic_load_n(&generation, __ATOMIC_SEQ_CST);
        int limit = __atomic_load_n(&waking, __ATOMIC_SEQ_CST);
        if (seen == last || index >= limit)
            continue;
        __atomic_add_fetch(&inside, 1, __ATOMIC_SEQ_CST);
        struct job *job = __atomic_load_n(&current, __ATOMIC_SEQ_CST);
        if (job == NULL || __atomic_load_n(&generation, __ATOMIC_SEQ_CST) != seen) {
            leave_job(); /* its caller took the last unit, or a later job began */
            continue;
        }
        last = seen;
        __atomic_add_fetch(&job->joined, 1, __ATOMIC_RELAXED);
        wake_range((index + 1) * WAKE_FANOUT, limit);
        job->take(job);
        leave_job();
        worked = 1;
    }
    return NULL;
}

/* Start helpers up to `wanted` (with pool_lock held); returns how many there are. */
static int grow_pool(int wanted)
{
    if (helpers >= wanted)
        return helpers;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 << 10); /* copy_bytes needs a few hundred bytes */
    /* Helpers take no signals: Python handles them on the threads it knows. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (helpers < wanted) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, helper, &wake[helpers]) != 0)
            break; /* out of threads: copy with those there are */
        helpers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return helpers;
}

/* A copy this big is left to the helpers (one more of them) while the caller waits, where
 * cores are plenty (helpers poll, see kvstack_set_helper_spin). A caller that copies fills its
 * own core's caches with the bytes, and the Python it runs next starts cold: right after a
 * 64 MiB shm write, a page batch's Python took 38 us to reach its native call, 21 us when the
 * caller had not copied; the batch 127 -> 109 us, the 64 MiB rate unchanged (74-76 GB/s, H200
 * machine). */
#define CALLER_WAITS_BYTES (8 << 20)

/* Run `job` on this thread and up to `wanted` helpers; returns how many threads took part.
 * The caller holds pool_lock and has checked that the pool is not busy; it is unlocked here. */
static int run_job(struct job *job, int wanted)
{
    int waits = job->take == take_chunks && job->total >= CALLER_WAITS_BYTES &&
                __atomic_load_n(&helper_spin_ns, __ATOMIC_RELAXED) > 0 &&
                grow_pool(wanted + 1) >= wanted + 1;
    if (waits)
        wanted++;
    int have = grow_pool(wanted);
    if (have < wanted)
        wanted = have;
    busy = 1;
    __atomic_store_n(&current, job, __ATOMIC_SEQ_CST);
    __atomic_store_n(&waking, wanted, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&pool_lock);
    wake_range(0, wanted);
    if (job->aside != NULL)
        job->aside(job->aside_arg);
    if (waits) { /* until every chunk is taken; then as if this thread had taken the last */
        while (__atomic_load_n(&job->next, __ATOMIC_RELAXED) < job->chunks) {
            cpu_relax();
        }
    } else {
        job->take(job);
    }
    /* Every unit is taken: helpers that come from now on join nothing. */
    __atomic_store_n(&current, NULL, __ATOMIC_SEQ_CST);
    int64_t spin = __atomic_load_n(&helper_spin_ns, __ATOMIC_RELAXED);
    if (spin > 0) { /* cores are plenty: poll for the last helper rather than sleep */
        int64_t until = now_ns() + spin;
        for (unsigned k = 1; __atomic_load_n(&inside, __ATOMIC_SEQ_CST) > 0; k++) {
            cpu_relax();
            if (k % 64 == 0 && now_ns() >= until)
                break;
        }
    }
    pthread_mutex_lock(&pool_lock);
    while (__atomic_load_n(&inside, __ATOMIC_SEQ_CST) > 0)
        pthread_cond_wait(&pool_done, &pool_lock);
    busy = 0;
    int joined = __atomic_load_n(&job->joined, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&pool_lock);
    return waits ? joined : joined + 1;
}

/* Copy lengths[i] bytes from srcs[i] to dsts[i] for every i < n (addresses as int64), on this
 * thread and up to threads - 1 helpers. Destinations must not overlap each other: chunks run
 * in no particular order. `stream`: long runs use streaming stores (copy_stream). Returns how
 * many threads copied: 1 when the batch was copied here alone (small, threads < 2, the pool
 * busy with another call, no memory for the table). */
/* kvstack_copy_ranges, with `aside(aside_arg)` run on this thread while helpers copy (or
 * before it copies alone), when not NULL. */
static int copy_ranges_aside(const int64_t *dsts, const int64_t *srcs, const int64_t *lengths,
                             int64_t n, int threads, int stream, void (*aside)(void *),
                             void *aside_arg)
{
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++)
        total += lengths[i];
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 2 || total < 2 * CHUNK_ALIGN) {
        if (aside != NULL)
            aside(aside_arg);
        copy_alone(dsts, srcs, lengths, n, stream);
        return 1;
    }
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool_lock);
    int64_t *starts = busy ? NULL : malloc((size_t)(n + 1) * sizeof *starts);
    if (starts == NULL) {
        pthread_mutex_unlock(&pool_lock);
        if (aside != NULL)
            aside(aside_arg);
        copy_alone(dsts, srcs, lengths, n, stream);
        return 1;
    }
    starts[0] = 0;
    for (int64_t i = 0; i < n; i++)
        starts[i + 1] = starts[i] + lengths[i];
    struct job job = {take_chunks, dsts, srcs, lengths, n, starts, total, 0, 0, 0, 0, stream,
                      NULL, NULL, 0, aside, aside_arg};
    int64_t chunk = total / ((int64_t)threads * CHUNKS_PER_THREAD);
    if (chunk > MAX_CHUNK_BYTES)
        chunk = MAX_CHUNK_BYTES;
    job.chunk_bytes = (chunk + CHUNK_ALIGN - 1) / CHUNK_ALIGN * CHUNK_ALIGN;
    job.big_chunks = total / TAPER_SHARE / job.chunk_bytes * (TAPER_SHARE - 1);
    job.taper_at = job.big_chunks * job.chunk_bytes;
    job.small_bytes = job.chunk_bytes / TAPER_SPLIT / CHUNK_ALIGN * CHUNK_ALIGN;
    if (job.small_bytes < CHUNK_ALIGN)
        job.small_bytes = CHUNK_ALIGN;
    job.chunks = job.big_chunks + (total - job.taper_at + job.small_bytes - 1) / job.small_bytes;
    int wanted = threads - 1 < job.chunks - 1 ? threads - 1 : (int)(job.chunks - 1);
    int used = run_job(&job, wanted);
    free(starts);
    return used;
}

int kvstack_copy_ranges(const int64_t *dsts, const int64_t *srcs, const int64_t *lengths,
                        int64_t n, int threads, int stream)
{
    return copy_ranges_aside(dsts, srcs, lengths, n, threads, stream, NULL, NULL);
}

/* Issue #3's page batch in one call, for the shm path of Engine.submit_pages: request i moves
 * lengths[i] bytes (every one `length` when lengths is NULL) between local_offsets[i] of the
 * local segment and remote_offsets[i] of the remote one (`reading`: remote to local). In
 * Python, its ~20 numpy calls took 150 us right after a 64 MiB copy (H100/H200 machines), more
 * than moving the batch's 4 MiB; here the checks and the addresses take one pass.
 *
 * Every request is checked before a byte moves: offsets and lengths >= 0, and each range inside
 * its segment. Returns the bytes copied, or -1 - i for the first bad request i (nothing was
 * copied: the caller finds out what is wrong with i). With `table` (int64 [3, n]) the three
 * columns are also copied there. Shared by bytes with up to threads - 1 helpers, one per
 * bytes_per_thread of the batch. A WRITE's pages go into the peer's memory with streaming
 * stores (see STREAM_MIN). */
/* The checks of a page batch's columns (see kvstack_copy_pages), with requests longer than
 * max_length refused too: the total bytes, or -1 - i for the first bad request i. */
static int64_t check_pages(const int64_t *local_offsets, const int64_t *remote_offsets,
                           const int64_t *lengths, int64_t length, int64_t n,
                           int64_t local_size, int64_t remote_size, int64_t max_length)
{
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t lo = local_offsets[i], ro = remote_offsets[i];
        int64_t len = lengths ? lengths[i] : length;
        /* offset + len > size <=> offset > size - len, without overflow for values >= 0 */
        if (lo < 0 || ro < 0 || len < 0 || len > max_length || lo > local_size - len ||
            ro > remote_size - len)
            return -1 - i;
        total += len;
    }
    return total;
}

static void copy_table(int64_t *table, const int64_t *local_offsets,
                       const int64_t *remote_offsets, const int64_t *lengths, int64_t length,
                       int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        table[i] = local_offsets[i];
        table[n + i] = remote_offsets[i];
        table[2 * n + i] = lengths ? lengths[i] : length;
    }
}

static int64_t copy_pages_aside(const int64_t *local_offsets, const int64_t *remote_offsets,
                                const int64_t *lengths, int64_t length, int64_t n,
                                int64_t *table, int64_t local_base, int64_t local_size,
                                int64_t remote_base, int64_t remote_size, int reading,
                                int threads, int64_t bytes_per_thread, void (*aside)(void *),
                                void *aside_arg)
{
    int64_t total = check_pages(local_offsets, remote_offsets, lengths, length, n, local_size,
                                remote_size, INT64_MAX);
    if (total < 0)
        return total;
    if (table != NULL)
        copy_table(table, local_offsets, remote_offsets, lengths, length, n);
    int64_t *columns = malloc((size_t)(3 * n + 1) * sizeof *columns);
    int64_t *locals = columns, *remotes = columns + n, *lens = columns + 2 * n;
    if (columns == NULL) { /* no memory for the address table: page by page, here alone */
        for (int64_t i = 0; i < n; i++) {
            int64_t len = lengths ? lengths[i] : length;
            char *local = (char *)(intptr_t)(local_base + local_offsets[i]);
            char *remote = (char *)(intptr_t)(remote_base + remote_offsets[i]);
            memmove(reading ? local : remote, reading ? remote : local, (size_t)len);
        }
        if (aside != NULL)
            aside(aside_arg);
        return total;
    }
    for (int64_t i = 0; i < n; i++) {
        locals[i] = local_base + local_offsets[i];
        remotes[i] = remote_base + remote_offsets[i];
        lens[i] = lengths ? lengths[i] : length;
    }
    int64_t wanted = bytes_per_thread > 0 ? total / bytes_per_thread : threads;
    if (wanted > threads)
        wanted = threads;
    int used = wanted < 1 ? 1 : (int)wanted;
    if (reading)
        copy_ranges_aside(locals, remotes, lens, n, used, 0, aside, aside_arg);
    else /* into the peer's memory, which this process will not read: streaming stores */
        copy_ranges_aside(remotes, locals, lens, n, used, 1, aside, aside_arg);
    free(columns);
    return total;
}

int64_t kvstack_copy_pages(const int64_t *local_offsets, const int64_t *remote_offsets,
                           const int64_t *lengths, int64_t length, int64_t n, int64_t *table,
                           int64_t local_base, int64_t local_size, int64_t remote_base,
                           int64_t remote_size, int reading, int threads,
                           int64_t bytes_per_thread)
{
    return copy_pages_aside(local_offsets, remote_offsets, lengths, length, n, table, local_base,
                            local_size, remote_base, remote_size, reading, threads,
                            bytes_per_thread, NULL, NULL);
}

/* A remembered shm route (Engine.transfer_pages, _transport.PageRoute): kvstack_copy_pages
 * between two segments whose addresses were worked out once, the remote owner checked on the
 * way. `route` holds local base and size, remote base and size, reading, threads,
 * bytes_per_thread, the owner's pid and the inode of its file at `path`. Issue #3: right after
 * a 64 MiB copy, checking the owner from Python (a kill and a stat) cost 5-10 us of a 4 MiB
 * batch's ~110; here this thread checks while the helpers copy.
 *
 * Returns the bytes copied; -1 - i for a bad request i (nothing copied); ROUTE_STALE when the
 * owner has exited or its file was replaced: the bytes went to (or came from) the old mapping,
 * which no live owner reads, and the caller must take the usual path, which redoes the batch
 * or names what is wrong. */
#define ROUTE_STALE INT64_MIN

struct owner_check {
    pid_t pid;
    ino_t inode;
    const char *path;
    int ok;
};

static void check_owner(void *arg)
{
    struct owner_check *check = arg;
    struct stat st;
    check->ok = (kill(check->pid, 0) == 0 || errno == EPERM) && stat(check->path, &st) == 0 &&
                st.st_ino == check->inode;
}

int64_t kvstack_copy_route(const int64_t *route, const char *path, const int64_t *local_offsets,
                           const int64_t *remote_offsets, const int64_t *lengths, int64_t length,
                           int64_t n)
{
    struct owner_check check = {(pid_t)route[7], (ino_t)route[8], path, 0};
    int64_t total = copy_pages_aside(local_offsets, remote_offsets, lengths, length, n, NULL,
                                     route[0], route[1], route[2], route[3], (int)route[4],
                                     (int)route[5], route[6], check_owner, &check);
    if (total < 0)
        return total;
    return check.ok ? total : ROUTE_STALE;
}

/* The tcp twin of kvstack_copy_pages: the same checks (and requests longer than max_length
 * refused: tcp sends those per request), then the columns into `table` (int64 [3, n]), each
 * request's (remote offset, length) as little-endian u64 pairs into `wire` (the frames' range
 * tables, 16 n bytes) and the address of its local bytes into `addresses`. Returns the total
 * bytes or -1 - i for the first bad request i (then the outputs are not written). Issue #3:
 * right after a 64 MiB write, the numpy calls this replaces took 190 us of a 4 MiB batch's
 * 1.1 ms on the H200 machine. */
int64_t kvstack_plan_pages(const int64_t *local_offsets, const int64_t *remote_offsets,
                           const int64_t *lengths, int64_t length, int64_t n, int64_t local_base,
                           int64_t local_size, int64_t remote_size, int64_t max_length,
                           int64_t *table, uint64_t *wire, int64_t *addresses)
{
    int64_t total = check_pages(local_offsets, remote_offsets, lengths, length, n, local_size,
                                remote_size, max_length);
    if (total < 0)
        return total;
    copy_table(table, local_offsets, remote_offsets, lengths, length, n);
    for (int64_t i = 0; i < n; i++) {
        uint64_t pair[2] = {(uint64_t)remote_offsets[i], (uint64_t)(lengths ? lengths[i] : length)};
        memcpy(wire + 2 * i, pair, sizeof pair); /* x86-64 and aarch64 Linux: little-endian */
        addresses[i] = local_base + local_offsets[i];
    }
    return total;
}

/* A received READV/WRITEV frame's range table (`count` little-endian u64 pairs: offset,
 * length) against a segment of `size` bytes at `base`: the address of each range into
 * `addresses` and its length into `lengths`. Returns 0; -1 when the lengths do not add up to
 * the frame's `frame_length` (a malformed frame); -2 - i when range i lies outside the
 * segment. The peer's per-frame numpy checks took 50-70 us there (see kvstack_plan_pages). */
int64_t kvstack_check_wire(const uint64_t *pairs, int64_t count, int64_t frame_length,
                           int64_t base, int64_t size, int64_t *addresses, int64_t *lengths)
{
    uint64_t total = 0;
    for (int64_t i = 0; i < count; i++) {
        uint64_t pair[2];
        memcpy(pair, pairs + 2 * i, sizeof pair);
        if (pair[1] > (uint64_t)frame_length || total + pair[1] > (uint64_t)frame_length)
            return -1;
        total += pair[1];
    }
    if (total != (uint64_t)frame_length)
        return -1;
    for (int64_t i = 0; i < count; i++) {
        uint64_t pair[2];
        memcpy(pair, pairs + 2 * i, sizeof pair);
        if (pair[0] > (uint64_t)size || pair[1] > (uint64_t)size - pair[0])
            return -2 - i;
        addresses[i] = base + (int64_t)pair[0];
        lengths[i] = (int64_t)pair[1];
    }
    return 0;
}

/* ---- KVH-64: the digest the store checks every object's bytes against -----------------
 *
 * Issue #4: XXH3-64 hashed cold bytes at 7.5 GB/s per core on the H200 machines' Xeons, so
 * a store put or verified read spent more time hashing than copying, and XXH3 cannot be split
 * across threads or computed inside the copy. KVH-64 is built for both:
 *
 *   - The bytes are cut into blocks of KVH_BLOCK (the last one shorter). Block j of a range is
 *     hashed on its own, so threads take blocks in any order, and the copy loop hashes each
 *     16 bytes it has just loaded: the source is read once for copy and digest together.
 *   - Inside a block, word i (8 bytes little-endian, the last one zero-padded) is mixed with a
 *     key that differs for every position, k_i = KVH_K0 + (i + 1) * KVH_STEP:
 *         d = w ^ k_i;   a += lo32(d) * hi32(d);   s += w        (all mod 2^64)
 *     The products (the NH construction of UMAC, also XXH3's inner loop) make a block's value
 *     depend on where each word sits; the plain sum s keeps the bits a zero half would hide.
 *   - block value  D_j = fmix(a ^ fmix(s ^ len_j * KVH_STEP)),  term_j = fmix(D_j + (j+1) * KVH_J)
 *     digest       fmix(sum_j term_j ^ fmix(len ^ KVH_SEED))      (fmix: MurmurHash3's finalizer)
 *     The terms add in any order; the block index inside each term keeps reordered blocks apart.
 *
 * It detects corruption (flipped bits, zeroed or stale pages, moved blocks), not an attacker's
 * forgery; the store's peers are trusted. _kvhash.py holds the same function in numpy (the
 * reference, and the path without a compiler); tests compare the two on random inputs. */
#define KVH_BLOCK (64 << 10)
#define KVH_K0 0x243F6A8885A308D3ull   /* fractional digits of pi */
#define KVH_STEP 0x9E3779B97F4A7C15ull /* 2^64 / golden ratio, odd: the keys never repeat */
#define KVH_J 0xD6E8FEB86659FD93ull
#define KVH_SEED 0x6B76737461636B31ull /* "kvstack1" */

static inline uint64_t fmix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 33;
    return h;
}

#if defined(__x86_64__)
/* The vector loops of kvh_block: `body` bytes (a multiple of their stride) at src, copied to
 * dst unless it is NULL; they add the words' products to *a and the words to *s. A vector's
 * lanes hold consecutive words, each xored with its own position's key; lanes are summed at
 * the end, so the loops' widths give the same digest. */
static void kvh_sse2(char *dst, const char *src, size_t body, uint64_t first, int stream,
                     uint64_t *a, uint64_t *s)
{
    uint64_t base = KVH_K0 + first * KVH_STEP; /* word `first` of the block comes first here */
    int streaming = dst != NULL && stream && ((uintptr_t)dst & 15) == 0;
    /* Few live vectors: with four key vectors and four word sums, accumulators spilled to
     * the stack every iteration (16 registers). The keys of the 2nd-4th vectors are k + step. */
    __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0, s0 = a0, s1 = a0;
    __m128i k = _mm_set_epi64x((long long)(base + 2 * KVH_STEP), (long long)(base + KVH_STEP));
    const __m128i step2 = _mm_set1_epi64x((long long)(2 * KVH_STEP));
    const __m128i step4 = _mm_set1_epi64x((long long)(4 * KVH_STEP));
    const __m128i step6 = _mm_set1_epi64x((long long)(6 * KVH_STEP));
    const __m128i next = _mm_set1_epi64x((long long)(8 * KVH_STEP));
    for (size_t i = 0; i < body; i += 64) {
        __m128i x0 = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i x1 = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i x2 = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i x3 = _mm_loadu_si128((const __m128i *)(src + i + 48));
        if (streaming) {
            _mm_stream_si128((__m128i *)(dst + i), x0);
            _mm_stream_si128((__m128i *)(dst + i + 16), x1);
            _mm_stream_si128((__m128i *)(dst + i + 32), x2);
            _mm_stream_si128((__m128i *)(dst + i + 48), x3);
        } else if (dst != NULL) {
            _mm_storeu_si128((__m128i *)(dst + i), x0);
            _mm_storeu_si128((__m128i *)(dst + i + 16), x1);
            _mm_storeu_si128((__m128i *)(dst + i + 32), x2);
            _mm_storeu_si128((__m128i *)(dst + i + 48), x3);
        }
        __m128i d0 = _mm_xor_si128(x0, k), d1 = _mm_xor_si128(x1, _mm_add_epi64(k, step2));
        __m128i d2 = _mm_xor_si128(x2, _mm_add_epi64(k, step4));
        __m128i d3 = _mm_xor_si128(x3, _mm_add_epi64(k, step6));
        /* _mm_mul_epu32: the low 32 bits of each 64-bit lane times those of the other operand */
        a0 = _mm_add_epi64(a0, _mm_mul_epu32(d0, _mm_srli_epi64(d0, 32)));
        a1 = _mm_add_epi64(a1, _mm_mul_epu32(d1, _mm_srli_epi64(d1, 32)));
        a2 = _mm_add_epi64(a2, _mm_mul_epu32(d2, _mm_srli_epi64(d2, 32)));
        a3 = _mm_add_epi64(a3, _mm_mul_epu32(d3, _mm_srli_epi64(d3, 32)));
        s0 = _mm_add_epi64(s0, _mm_add_epi64(x0, x2));
        s1 = _mm_add_epi64(s1, _mm_add_epi64(x1, x3));
        k = _mm_add_epi64(k, next);
    }
    if (streaming)
        _mm_sfence(); /* the bytes are visible before the caller commits them */
    uint64_t lanes[2];
    _mm_storeu_si128((__m128i *)lanes, _mm_add_epi64(_mm_add_epi64(a0, a1), _mm_add_epi64(a2, a3)));
    *a += lanes[0] + lanes[1];
    _mm_storeu_si128((__m128i *)lanes, _mm_add_epi64(s0, s1));
    *s += lanes[0] + lanes[1];
}

#if defined(__GNUC__) || defined(__clang__)
#define KVH_AVX2 1
#else
#define KVH_AVX2 0
#endif
#if KVH_AVX2
#include <immintrin.h>
/* AVX2 (every x86-64 server since 2013): twice the width; chosen at run time. */
__attribute__((target("avx2"))) static void kvh_avx2(char *dst, const char *src, size_t body,
                                                     uint64_t first, int stream, uint64_t *a,
                                                     uint64_t *s)
{
    uint64_t base = KVH_K0 + first * KVH_STEP;
    int streaming = dst != NULL && stream && ((uintptr_t)dst & 31) == 0;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, s0 = a0, s1 = a0;
    __m256i k = _mm256_set_epi64x((long long)(base + 4 * KVH_STEP), (long long)(base + 3 * KVH_STEP),
                                  (long long)(base + 2 * KVH_STEP), (long long)(base + KVH_STEP));
    const __m256i step4 = _mm256_set1_epi64x((long long)(4 * KVH_STEP));
    const __m256i step8 = _mm256_set1_epi64x((long long)(8 * KVH_STEP));
    const __m256i step12 = _mm256_set1_epi64x((long long)(12 * KVH_STEP));
    const __m256i next = _mm256_set1_epi64x((long long)(16 * KVH_STEP));
    for (size_t i = 0; i < body; i += 128) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i x2 = _mm256_loadu_si256((const __m256i *)(src + i + 64));
        __m256i x3 = _mm256_loadu_si256((const __m256i *)(src + i + 96));
        if (streaming) {
            _mm256_stream_si256((__m256i *)(dst + i), x0);
            _mm256_stream_si256((__m256i *)(dst + i + 32), x1);
            _mm256_stream_si256((__m256i *)(dst + i + 64), x2);
            _mm256_stream_si256((__m256i *)(dst + i + 96), x3);
        } else if (dst != NULL) {
            _mm256_storeu_si256((__m256i *)(dst + i), x0);
            _mm256_storeu_si256((__m256i *)(dst + i + 32), x1);
            _mm256_storeu_si256((__m256i *)(dst + i + 64), x2);
            _mm256_storeu_si256((__m256i *)(dst + i + 96), x3);
        }
        __m256i d0 = _mm256_xor_si256(x0, k);
        __m256i d1 = _mm256_xor_si256(x1, _mm256_add_epi64(k, step4));
        __m256i d2 = _mm256_xor_si256(x2, _mm256_add_epi64(k, step8));
        __m256i d3 = _mm256_xor_si256(x3, _mm256_add_epi64(k, step12));
        a0 = _mm256_add_epi64(a0, _mm256_mul_epu32(d0, _mm256_srli_epi64(d0, 32)));
        a1 = _mm256_add_epi64(a1, _mm256_mul_epu32(d1, _mm256_srli_epi64(d1, 32)));
        a2 = _mm256_add_epi64(a2, _mm256_mul_epu32(d2, _mm256_srli_epi64(d2, 32)));
        a3 = _mm256_add_epi64(a3, _mm256_mul_epu32(d3, _mm256_srli_epi64(d3, 32)));
        s0 = _mm256_add_epi64(s0, _mm256_add_epi64(x0, x2));
        s1 = _mm256_add_epi64(s1, _mm256_add_epi64(x1, x3));
        k = _mm256_add_epi64(k, next);
    }
    if (streaming)
        _mm_sfence();
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes,
                        _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
    *a += lanes[0] + lanes[1] + lanes[2] + lanes[3];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(s0, s1));
    *s += lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

static int has_avx2(void)
{
    static int known = -1; /* a race here only repeats the same answer */
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return known;
}
#endif
#endif

/* Block `j` (len <= KVH_BLOCK bytes at src): its term, copying it to dst on the way unless dst
 * is NULL, with streaming stores when asked (and dst is aligned for them). */
static uint64_t kvh_block(char *dst, const char *src, size_t len, uint64_t j, int stream)
{
    uint64_t a = 0, s = 0;
    size_t i = 0;
#if defined(__x86_64__)
#if KVH_AVX2
    if (has_avx2()) {
        i = len & ~(size_t)127;
        kvh_avx2(dst, src, i, 0, stream, &a, &s);
    }
#endif
    size_t body = (len - i) & ~(size_t)63;
    if (body)
        kvh_sse2(dst ? dst + i : NULL, src + i, body, i / 8, stream, &a, &s);
    i += body;
#endif
    uint64_t key = KVH_K0 + (uint64_t)(i / 8 + 1) * KVH_STEP;
    for (; i < len; i += 8, key += KVH_STEP) {
        size_t take = len - i < 8 ? len - i : 8;
        uint64_t w = 0; /* little-endian hosts: the bytes in order, zero-padded */
        memcpy(&w, src + i, take);
        if (dst != NULL)
            memcpy(dst + i, src + i, take);
        uint64_t d = w ^ key;
        a += (d & 0xFFFFFFFFull) * (d >> 32);
        s += w;
    }
    uint64_t block = fmix(a ^ fmix(s ^ (uint64_t)len * KVH_STEP));
    return fmix(block + (j + 1) * KVH_J);
}

static uint64_t kvh_final(uint64_t sum, int64_t length)
{
    return fmix(sum ^ fmix((uint64_t)length ^ KVH_SEED));
}

/* Block `u` of the batch (starts[i]: blocks before range i): add its term to its range's sum. */
static void kvh_unit(const struct job *job, int64_t u)
{
    int64_t a = 0, b = job->n - 1; /* the range holding block u: the last start <= u */
    while (a < b) {
        int64_t mid = a + (b - a + 1) / 2;
        if (job->starts[mid] <= u)
            a = mid;
        else
            b = mid - 1;
    }
    int64_t j = u - job->starts[a];
    int64_t offset = j * KVH_BLOCK;
    int64_t left = job->lengths[a] - offset;
    size_t len = (size_t)(left < KVH_BLOCK ? left : KVH_BLOCK);
    char *dst = job->dsts != NULL ? (char *)(intptr_t)job->dsts[a] + offset : NULL;
    uint64_t term = kvh_block(dst, (const char *)(intptr_t)job->srcs[a] + offset, len,
                              (uint64_t)j, job->stream);
    __atomic_fetch_add(&job->sums[a], term, __ATOMIC_RELAXED);
}

static void take_blocks(struct job *job)
{
    for (;;) {
        int64_t u = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (u >= job->total)
            return;
        kvh_unit(job, u);
    }
}

/* The KVH-64 digest of each range (srcs[i], lengths[i]) into out[i]; with dsts (not NULL) each
 * range is also copied to dsts[i] (destinations must not overlap), streaming when asked. On
 * this thread and up to threads - 1 helpers; returns how many threads took part, or -1 when
 * there was no memory for the tables (nothing was done). */
int kvstack_hash_ranges(const int64_t *dsts, const int64_t *srcs, const int64_t *lengths,
                        int64_t n, int threads, int stream, uint64_t *out)
{
    int64_t *starts = malloc((size_t)(n + 1) * sizeof *starts);
    if (starts == NULL)
        return -1;
    starts[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        starts[i + 1] = starts[i] + (lengths[i] + KVH_BLOCK - 1) / KVH_BLOCK;
        out[i] = 0;
    }
    struct job job = {take_blocks, dsts, srcs, lengths, n, starts, starts[n], 0, 0, 0, 0, stream,
                      out, NULL, 0, NULL, NULL};
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    int used = 1;
    int helping = threads - 1 < job.total - 1 ? threads - 1 : (int)(job.total - 1);
    if (helping > 0) {
        pthread_once(&pool_once, pool_init);
        pthread_mutex_lock(&pool_lock);
        if (busy) { /* another call owns the pool: hash here alone */
            pthread_mutex_unlock(&pool_lock);
            take_blocks(&job);
        } else {
            used = run_job(&job, helping);
        }
    } else {
        take_blocks(&job);
    }
    for (int64_t i = 0; i < n; i++)
        out[i] = kvh_final(out[i], lengths[i]);
    free(starts);
    return used;
}

/* One range, for callers that have plain addresses (no arrays to build): its digest. */
uint64_t kvstack_hash_copy(int64_t dst, int64_t src, int64_t length, int threads, int stream)
{
    uint64_t out = 0;
    if (threads < 2 || length <= KVH_BLOCK) {
        uint64_t sum = 0;
        char *to = dst ? (char *)(intptr_t)dst : NULL;
        for (int64_t j = 0; j * KVH_BLOCK < length; j++) {
            int64_t left = length - j * KVH_BLOCK;
            sum += kvh_block(to ? to + j * KVH_BLOCK : NULL,
                             (const char *)(intptr_t)src + j * KVH_BLOCK,
                             (size_t)(left < KVH_BLOCK ? left : KVH_BLOCK), (uint64_t)j, stream);
        }
        return kvh_final(sum, length);
    }
    if (kvstack_hash_ranges(dst ? &dst : NULL, &src, &length, 1, threads, stream, &out) < 0)
        return kvstack_hash_copy(dst, src, length, 1, stream); /* no memory: alone */
    return out;
}

/* ---- socket I/O straight between a socket and ranges -----------------------------------
 *
 * `*done` counts the bytes moved so far, across calls: a call that returns because the
 * socket's timeout tick passed (-EAGAIN) or a signal arrived (-EINTR) is called again and
 * resumes there. Return 0 once every byte moved, -errno on an error, 1 when the peer closed
 * the connection (recv). */

/* Linux's IOV_MAX; a tcp frame carries at most 1024 ranges (_tcp._VEC_MAX) anyway. */
#define IOV_BATCH 1024

static int64_t sum(const int64_t *lengths, int64_t n)
{
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++)
        total += lengths[i];
    return total;
}

/* iovecs for the ranges from byte `pos` of their byte stream on (empty ranges left out). */
static int fill(struct iovec *iov, const int64_t *addresses, const int64_t *lengths, int64_t n,
                int64_t pos)
{
    int64_t i = 0;
    while (i < n && pos >= lengths[i])
        pos -= lengths[i++];
    int k = 0;
    for (; i < n && k < IOV_BATCH; i++, pos = 0) {
        if (lengths[i] == pos)
            continue;
        iov[k].iov_base = (char *)(intptr_t)addresses[i] + pos;
        iov[k].iov_len = (size_t)(lengths[i] - pos);
        k++;
    }
    return k;
}

/* Send every range, in order, on socket fd. MSG_NOSIGNAL: a closed peer is EPIPE, never a
 * SIGPIPE, whatever the process's signal setup. */
int kvstack_send_ranges(int fd, const int64_t *addresses, const int64_t *lengths, int64_t n,
                        int64_t *done)
{
    struct iovec iov[IOV_BATCH];
    int64_t total = sum(lengths, n);
    while (*done < total) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)fill(iov, addresses, lengths, n, *done);
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (sent < 0)
            return -errno;
        *done += sent;
    }
    return 0;
}

/* Fill every range, in order: the first `buffered_bytes` (at most the ranges' total) from
 * `buffered`, bytes the caller already read from the socket; the rest from socket fd. */
int kvstack_recv_ranges(int fd, const int64_t *addresses, const int64_t *lengths, int64_t n,
                        const char *buffered, int64_t buffered_bytes, int64_t *done)
{
    struct iovec iov[IOV_BATCH];
    while (*done < buffered_bytes) {
        int k = fill(iov, addresses, lengths, n, *done);
        if (k == 0)
            break; /* more buffered bytes than ranges: the caller never passes that */
        for (int j = 0; j < k && *done < buffered_bytes; j++) {
            size_t take = iov[j].iov_len;
            if ((int64_t)take > buffered_bytes - *done)
                take = (size_t)(buffered_bytes - *done);
            memcpy(iov[j].iov_base, buffered + *done, take);
            *done += (int64_t)take;
        }
    }
    int64_t total = sum(lengths, n);
    while (*done < total) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)fill(iov, addresses, lengths, n, *done);
        ssize_t got = recvmsg(fd, &msg, 0);
        if (got < 0)
            return -errno;
        if (got == 0)
            return 1;
        *done += got;
    }
    return 0;
}

/* ---- serving frames ----------------------------------------------------------------------
 *
 * The tcp server's hot paths, issue #3: on the H100 machines a WRITEV frame waited 100-240 us
 * between its bytes arriving and the peer's Python thread starting to receive them (a wake-up,
 * then ~20 Python steps run cold, one connection's thread at a time under the GIL), and a
 * 4 KiB WRITE spent more in the server's Python than on the wire. Here a connection's thread
 * waits for its next frame and, if it reads or writes a segment it already knows, checks it,
 * moves its bytes and replies without the GIL.
 *
 * Anything else is handed back to Python ("punted") with the bytes read so far, which Python
 * then handles as before: other ops, unknown segments, bad frames (Python names the error),
 * and every frame after the segment table changed (`*generation` != `expected`: a segment was
 * withdrawn, so Python re-checks the names first). `segments` holds n rows (base address, size,
 * read-only, offset of the name in `names`, name length); Python keeps the memory mapped for
 * the whole call. `scratch` must hold SERVE_SCRATCH bytes. */
/* The wire format of _framing.py: its HEADER ("<4sBBHQQQ", magic b"KVTE", VERSION 1), FrameOp
 * values, _MAX_NAME_BYTES and _tcp._VEC_MAX; _native.SERVE_SCRATCH repeats the sum. */
#define SERVE_SCRATCH (32 + 4096 + 16 * 1024)
#define FRAME_HEADER 32
#define OP_READ 2
#define OP_WRITE 3
#define OP_OK 4
#define OP_READV 6
#define OP_WRITEV 7
enum { SERVE_DONE = 0, SERVE_PUNT = 1, SERVE_IDLE = 2, SERVE_EOF = 3, SERVE_STALL = 4 };

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Read exactly n bytes into buf, starting `*got` bytes in. Returns SERVE_DONE, SERVE_EOF,
 * SERVE_STALL (the socket's timeout tick passed) or -errno. */
static int read_exact(int fd, char *buf, int64_t n, int64_t *got)
{
    while (*got < n) {
        ssize_t k = recv(fd, buf + *got, (size_t)(n - *got), 0);
        if (k == 0)
            return SERVE_EOF;
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? SERVE_STALL : -errno;
        }
        *got += k;
    }
    return SERVE_DONE;
}

/* A socket call's -errno as a SERVE_* status. */
static int64_t io_status(int r)
{
    return r == -EAGAIN || r == -EWOULDBLOCK ? SERVE_STALL : r;
}

/* out[0]: DONE: the payload's bytes; PUNT: the bytes left in scratch for Python. out[1]: the
 * request id (DONE); out[2]: the op served (DONE). Returns a SERVE_* status or -errno. */
int64_t kvstack_serve_frame(int fd, const int64_t *segments, int64_t n, const char *names,
                            const volatile int64_t *generation, int64_t expected, char *scratch,
                            int64_t poll_ns, int64_t *out)
{
    int64_t got = 0;
    out[0] = 0;
    /* Idle: poll for the next frame a while (a sleeping thread is woken late), then block. */
    int64_t until = now_ns() + poll_ns;
    for (;;) {
        ssize_t k = recv(fd, scratch, FRAME_HEADER, MSG_DONTWAIT);
        if (k > 0) {
            got = k;
            break;
        }
        if (k == 0)
            return SERVE_EOF;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return -errno;
        if (now_ns() >= until)
            break;
        sched_yield(); /* the peer may be queued on this very CPU: let it run */
    }
    if (got == 0) {
        ssize_t k = recv(fd, scratch, FRAME_HEADER, 0);
        if (k == 0)
            return SERVE_EOF;
        if (k < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? SERVE_IDLE : -errno;
        got = k;
    }
    int status = read_exact(fd, scratch, FRAME_HEADER, &got);
    if (status != SERVE_DONE)
        return status;
    out[0] = got;
    uint8_t version = (uint8_t)scratch[4], op = (uint8_t)scratch[5];
    uint16_t name_len;
    uint64_t request_id, offset, length; /* READV, WRITEV: `offset` holds the range count */
    memcpy(&name_len, scratch + 6, 2);
    memcpy(&request_id, scratch + 8, 8);
    memcpy(&offset, scratch + 16, 8);
    memcpy(&length, scratch + 24, 8);
    int vector = op == OP_READV || op == OP_WRITEV;
    int reading = op == OP_READ || op == OP_READV;
    if (memcmp(scratch, "KVTE", 4) != 0 || version != 1 ||
        (!vector && op != OP_READ && op != OP_WRITE) || name_len > 4096 ||
        (vector && offset > 1024) || length > ((uint64_t)1 << 48))
        return SERVE_PUNT;
    status = read_exact(fd, scratch, FRAME_HEADER + name_len, &got);
    out[0] = got;
    if (status != SERVE_DONE)
        return status;
    const int64_t *seg = NULL;
    for (int64_t i = 0; i < n && seg == NULL; i++) {
        const int64_t *row = segments + 5 * i;
        if (row[4] == name_len && memcmp(names + row[3], scratch + FRAME_HEADER, name_len) == 0)
            seg = row;
    }
    if (seg == NULL || (!reading && seg[2] /* read-only */))
        return SERVE_PUNT;
    /* Range 0 is the reply's header (reads); the payload's ranges follow. */
    int64_t count = vector ? (int64_t)offset : 1;
    int64_t addresses[1 + 1024], lengths[1 + 1024];
    if (vector) {
        char *table = scratch + FRAME_HEADER + name_len;
        status = read_exact(fd, scratch, FRAME_HEADER + name_len + count * 16, &got);
        out[0] = got;
        if (status != SERVE_DONE)
            return status;
        if (kvstack_check_wire((const uint64_t *)(void *)table, count, (int64_t)length, seg[0],
                               seg[1], addresses + 1, lengths + 1) != 0)
            return SERVE_PUNT; /* Python names what is wrong */
    } else {
        if (offset > (uint64_t)seg[1] || length > (uint64_t)seg[1] - offset)
            return SERVE_PUNT; /* out of bounds: Python names it */
        addresses[1] = seg[0] + (int64_t)offset;
        lengths[1] = (int64_t)length;
    }
    if (*generation != expected) /* a segment was withdrawn meanwhile: Python re-checks */
        return SERVE_PUNT;
    /* The reply: OK; a READ's echoes its offset, a read's carries the payload. */
    char reply[FRAME_HEADER] = {'K', 'V', 'T', 'E', 1, OP_OK, 0, 0};
    uint64_t reply_offset = op == OP_READ ? offset : 0, reply_length = reading ? length : 0;
    memcpy(reply + 8, &request_id, 8);
    memcpy(reply + 16, &reply_offset, 8);
    memcpy(reply + 24, &reply_length, 8);
    addresses[0] = (int64_t)(intptr_t)reply;
    lengths[0] = FRAME_HEADER;
    int64_t done = 0;
    if (!reading) {
        for (;;) {
            int r = kvstack_recv_ranges(fd, addresses + 1, lengths + 1, count, NULL, 0, &done);
            if (r == 0)
                break;
            if (r == 1)
                return SERVE_EOF;
            if (r != -EINTR)
                return io_status(r);
        }
        done = 0;
    }
    for (;;) {
        int r = kvstack_send_ranges(fd, addresses, lengths, reading ? 1 + count : 1, &done);
        if (r == 0)
            break;
        if (r != -EINTR)
            return io_status(r);
    }
    out[0] = (int64_t)length;
    out[1] = (int64_t)request_id;
    out[2] = op;
    return SERVE_DONE;
}

/* ---- sending one frame on each of several sockets at once ---------------------------------
 *
 * The client side of a tcp page batch, issue #3: its frames went out from the caller and from
 * pool threads, which started one after another as each took the GIL (+73, +122, +274 us for
 * four connections on the H200 machine). Here each socket's frame is one unit of a job on the
 * parked helpers. A unit is SEND_UNIT int64s: the socket, the address and length of the
 * frame's head (header, name, range table: one buffer), the number of pages, the addresses of
 * their address and length arrays, and the status this call writes: 0 (sent), -ETIMEDOUT (the
 * deadline, CLOCK_MONOTONIC ns, passed first) or -errno. */
#define SEND_UNIT 7

static void send_unit(int64_t *unit, int64_t deadline_ns)
{
    int fd = (int)unit[0];
    int64_t n = unit[3];
    const int64_t *addresses = (const int64_t *)(intptr_t)unit[4];
    const int64_t *lengths = (const int64_t *)(intptr_t)unit[5];
    int64_t all_addresses[1025], all_lengths[1025]; /* the head, then at most 1024 pages */
    if (n > 1024) {
        unit[6] = -EINVAL;
        return;
    }
    all_addresses[0] = unit[1];
    all_lengths[0] = unit[2];
    memcpy(all_addresses + 1, addresses, (size_t)n * sizeof *addresses);
    memcpy(all_lengths + 1, lengths, (size_t)n * sizeof *lengths);
    int64_t done = 0;
    for (;;) {
        int r = kvstack_send_ranges(fd, all_addresses, all_lengths, n + 1, &done);
        if (r == 0 || (r != -EAGAIN && r != -EWOULDBLOCK && r != -EINTR)) {
            unit[6] = r;
            return;
        }
        if (r != -EINTR && now_ns() > deadline_ns) { /* the socket's tick passed: look */
            unit[6] = -ETIMEDOUT;
            return;
        }
    }
}

static void take_sends(struct job *job)
{
    for (;;) {
        int64_t u = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (u >= job->total)
            return;
        send_unit(job->sends + SEND_UNIT * u, job->deadline_ns);
    }
}

/* Send the n units' frames, each on its socket, on this thread and up to n - 1 helpers (this
 * thread alone if another call owns the pool). Statuses go into each unit. */
void kvstack_send_parallel(int64_t *units, int64_t n, int64_t deadline_ns)
{
    struct job job;
    memset(&job, 0, sizeof job);
    job.take = take_sends;
    job.total = n;
    job.sends = units;
    job.deadline_ns = deadline_ns;
    int helping = n - 1 < MAX_THREADS ? (int)(n - 1) : MAX_THREADS;
    if (helping > 0) {
        pthread_once(&pool_once, pool_init);
        pthread_mutex_lock(&pool_lock);
        if (!busy) {
            run_job(&job, helping);
            return;
        }
        pthread_mutex_unlock(&pool_lock);
    }
    take_sends(&job);
}

/* Issue #3's tcp page WRITE from its columns to the wire in one call: the checks of
 * kvstack_plan_pages, then one WRITEV frame per connection, all sent at once as
 * kvstack_send_parallel does. `conns` holds k rows of SEND_PAGES_CONN int64s: socket, request
 * id, and the status this call writes (0 sent, -ETIMEDOUT, -errno); connection c carries
 * requests c * share .. (c + 1) * share - 1, where share = ceil(n / k) (at most 1024,
 * _tcp._VEC_MAX). The frame is _tcp._PageVec's: a header
 * (op WRITEV, the name's length, the request id, offset = page count, length = bytes), the
 * segment name, the (remote offset, length) u64 pairs, then the pages. Returns the total
 * bytes; -1 - i for the first bad request i (nothing sent); INT64_MIN when share is over
 * 1024 or there is no memory (nothing sent). Right after a 64 MiB write, the Python this
 * replaces (the plan's arrays, a frame object and a range view per connection, the send
 * table) took ~190 us before the first byte left (H200 machine). */
#define SEND_PAGES_CONN 3

int64_t kvstack_send_pages(const int64_t *local_offsets, const int64_t *remote_offsets,
                           const int64_t *lengths, int64_t length, int64_t n, int64_t local_base,
                           int64_t local_size, int64_t remote_size, int64_t max_length,
                           const char *name, int64_t name_len, int64_t *conns, int64_t k,
                           int64_t deadline_ns)
{
    int64_t total = check_pages(local_offsets, remote_offsets, lengths, length, n, local_size,
                                remote_size, max_length);
    if (total < 0)
        return total;
    int64_t share = k > 0 ? (n + k - 1) / k : 0;
    if (k < 1 || share > 1024 || name_len < 0 || name_len > 4096)
        return INT64_MIN;
    int64_t head_bytes = FRAME_HEADER + name_len; /* + 16 per page of the frame */
    /* The frames' heads and range tables, then (8-byte aligned) the int64 columns. */
    size_t columns_at = ((size_t)(k * head_bytes + 16 * n) + 7) & ~(size_t)7;
    size_t size = columns_at + (size_t)(2 * n + SEND_UNIT * k) * sizeof(int64_t);
    char *heads = malloc(size);
    if (heads == NULL)
        return INT64_MIN;
    int64_t *addresses = (int64_t *)(void *)(heads + columns_at);
    int64_t *lens = addresses + n;
    int64_t *units = lens + n;
    for (int64_t i = 0; i < n; i++)
        lens[i] = lengths ? lengths[i] : length;
    char *head = heads;
    for (int64_t c = 0; c < k; c++) {
        int64_t first = c * share, last = first + share < n ? first + share : n;
        int64_t count = last > first ? last - first : 0, bytes = 0;
        char *pairs = head + head_bytes;
        for (int64_t i = first; i < last; i++) {
            uint64_t pair[2] = {(uint64_t)remote_offsets[i], (uint64_t)lens[i]};
            memcpy(pairs + 16 * (i - first), pair, sizeof pair); /* little-endian hosts */
            addresses[i] = local_base + local_offsets[i];
            bytes += lens[i];
        }
        uint16_t name_u16 = (uint16_t)name_len;
        uint64_t request_id = (uint64_t)conns[SEND_PAGES_CONN * c + 1];
        uint64_t offset = (uint64_t)count, frame_bytes = (uint64_t)bytes;
        memcpy(head, "KVTE", 4);
        head[4] = 1;
        head[5] = OP_WRITEV;
        memcpy(head + 6, &name_u16, 2);
        memcpy(head + 8, &request_id, 8);
        memcpy(head + 16, &offset, 8);
        memcpy(head + 24, &frame_bytes, 8);
        memcpy(head + FRAME_HEADER, name, (size_t)name_len);
        int64_t *unit = units + SEND_UNIT * c;
        unit[0] = conns[SEND_PAGES_CONN * c];
        unit[1] = (int64_t)(intptr_t)head;
        unit[2] = head_bytes + 16 * count;
        unit[3] = count;
        unit[4] = (int64_t)(intptr_t)(addresses + first);
        unit[5] = (int64_t)(intptr_t)(lens + first);
        unit[6] = 0;
        head = pairs + 16 * count;
    }
    kvstack_send_parallel(units, k, deadline_ns);
    for (int64_t c = 0; c < k; c++)
        conns[SEND_PAGES_CONN * c + 2] = units[SEND_UNIT * c + 6];
    free(heads);
    return total;
}

/* ---- the client's replies to a synchronous page batch ------------------------------------
 *
 * Issue #3: the four replies of a tcp page batch were read by four Python receiver threads,
 * one after another under the GIL, each then waking the caller through a threading.Event:
 * ~100 us after the last frame had landed (H200 machine). Now the caller "arms" a slot per
 * frame (its request id, and a state word), sends, and waits on the states; each connection's
 * receiver thread waits for replies here and takes an OK without payload to an armed request
 * itself: the slot goes ARMED -> OK and its waiter is woken, no GIL on the way. Anything else
 * goes back to Python with the bytes read so far. Python fails a slot (ARMED -> FAILED) when
 * the connection dies or the request's deadline passes; whichever side moves a slot first
 * decides its verdict (compare-and-swap). The slot arrays belong to the connection and live
 * as long as it, so a late reply never writes into freed memory. */
enum { SLOT_FREE = 0, SLOT_ARMED = 1, SLOT_OK = 2, SLOT_FAILED = 3 };
enum { REPLY_PUNT = 1, REPLY_IDLE = 2, REPLY_EOF = 3 };

static void wake_slot(int32_t *state)
{
#if defined(__linux__)
    syscall(SYS_futex, state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
#else
    (void)state;
#endif
}

/* Move slot `state` from ARMED to `to` and wake its waiter; 1 if this call moved it. */
int kvstack_finish_slot(int32_t *state, int32_t to)
{
    int32_t armed = SLOT_ARMED;
    if (!__atomic_compare_exchange_n(state, &armed, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    wake_slot(state);
    return 1;
}

/* Wait on socket fd for replies; take each OK without payload whose request id is that of an
 * armed slot (ids[i], states[i], i < n). Returns (out[0]: the bytes left in scratch, which
 * holds FRAME_HEADER bytes) REPLY_PUNT with a reply for Python (or part of one), REPLY_IDLE
 * when the socket's timeout tick passed with nothing read, REPLY_EOF, or -errno. (Polling
 * before blocking, here or in the waiter, gained nothing measurable: page batch p50 786-823 us
 * either way, H100 machine.) */
int64_t kvstack_await_replies(int fd, const int64_t *ids, int32_t *states, int64_t n,
                              char *scratch, int64_t *out)
{
    for (;;) {
        int64_t got = 0;
        out[0] = 0;
        while (got < FRAME_HEADER) {
            ssize_t k = recv(fd, scratch + got, (size_t)(FRAME_HEADER - got), 0);
            if (k == 0)
                return REPLY_EOF;
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    out[0] = got; /* a tick: Python checks deadlines, then reads the rest */
                    return got ? REPLY_PUNT : REPLY_IDLE;
                }
                return -errno;
            }
            got += k;
        }
        out[0] = got;
        uint64_t request_id, length;
        memcpy(&request_id, scratch + 8, 8);
        memcpy(&length, scratch + 24, 8);
        if (memcmp(scratch, "KVTE", 4) != 0 || scratch[4] != 1 || scratch[5] != OP_OK ||
            length != 0)
            return REPLY_PUNT;
        int64_t slot = -1;
        for (int64_t i = 0; i < n && slot < 0; i++)
            if ((uint64_t)ids[i] == request_id &&
                __atomic_load_n(&states[i], __ATOMIC_ACQUIRE) == SLOT_ARMED)
                slot = i;
        if (slot < 0 || !kvstack_finish_slot(&states[slot], SLOT_OK))
            return REPLY_PUNT; /* not armed (or failed meanwhile): Python's to handle */
    }
}

/* Wait until slot `state` is no longer ARMED or deadline_ns (CLOCK_MONOTONIC) passes;
 * returns the state it ended in (ARMED: the deadline). */
int32_t kvstack_wait_slot(int32_t *state, int64_t deadline_ns)
{
    int32_t value;
    while ((value = __atomic_load_n(state, __ATOMIC_ACQUIRE)) == SLOT_ARMED) {
        int64_t t = now_ns();
        if (t >= deadline_ns)
            return value;
#if defined(__linux__)
        int64_t left = deadline_ns - t;
        struct timespec timeout = {(time_t)(left / 1000000000), (long)(left % 1000000000)};
        syscall(SYS_futex, state, FUTEX_WAIT_PRIVATE, SLOT_ARMED, &timeout, NULL, 0);
#else
        sched_yield();
#endif
    }
    return value;
}

/* ---- one small request on a lane (client side) -------------------------------------------
 *
 * Issue #3's 4 KiB tcp latency: a lane call (the calling thread's own connection, _tcp._Lane)
 * is one frame out and one reply back. Here both happen in one call without the GIL: send
 * `head` (the frame's header and name) and, for a WRITE, `payload_len` bytes at `payload`; then
 * take the reply, polling `poll_ns` for it before blocking (a sleeping thread is woken late).
 * An OK to `request_id` carrying `dest_len` bytes (a READ's payload, received into `dest`; a
 * WRITE's carries none) is LANE_DONE. Any other reply is LANE_PUNT with its first out[0]
 * bytes in `scratch` (FRAME_HEADER bytes), for Python to read and name. LANE_TIMEOUT: the
 * deadline passed (the socket's tick lets this be noticed); LANE_EOF: the peer closed. After
 * anything but DONE the lane's stream may be mid-frame: Python never reuses it. */
enum { LANE_DONE = 0, LANE_PUNT = 1, LANE_TIMEOUT = 2, LANE_EOF = 3 };

/* read_exact until all n bytes are in (LANE_DONE), the peer closes (LANE_EOF) or the deadline
 * passes (LANE_TIMEOUT, checked at each tick of the socket); else -errno. */
static int64_t lane_read(int fd, char *buf, int64_t n, int64_t *got, int64_t deadline_ns)
{
    for (;;) {
        int status = read_exact(fd, buf, n, got);
        if (status == SERVE_DONE)
            return LANE_DONE;
        if (status == SERVE_EOF)
            return LANE_EOF;
        if (status != SERVE_STALL)
            return status == -ECONNRESET ? LANE_EOF : status;
        if (now_ns() >= deadline_ns)
            return LANE_TIMEOUT;
    }
}

int64_t kvstack_lane_call(int fd, const char *head, int64_t head_len, int64_t payload,
                          int64_t payload_len, int64_t dest, int64_t dest_len, uint64_t request_id,
                          int64_t poll_ns, int64_t deadline_ns, char *scratch, int64_t *out)
{
    out[0] = 0;
    int64_t addresses[2] = {(int64_t)(intptr_t)head, payload};
    int64_t lengths[2] = {head_len, payload_len};
    int64_t done = 0;
    for (;;) {
        int r = kvstack_send_ranges(fd, addresses, lengths, 2, &done);
        if (r == 0)
            break;
        if (r == -EAGAIN || r == -EWOULDBLOCK) {
            if (now_ns() >= deadline_ns)
                return LANE_TIMEOUT;
        } else if (r != -EINTR) {
            return r == -EPIPE || r == -ECONNRESET ? LANE_EOF : r;
        }
    }
    int64_t got = 0;
    int64_t until = now_ns() + poll_ns;
    while (got == 0) {
        ssize_t k = recv(fd, scratch, FRAME_HEADER, MSG_DONTWAIT);
        if (k > 0)
            got = k;
        else if (k == 0)
            return LANE_EOF;
        else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return errno == ECONNRESET ? LANE_EOF : -errno;
        else if (now_ns() >= until)
            break;
        else
            sched_yield(); /* the peer may be queued on this very CPU: let it run */
    }
    int64_t status = lane_read(fd, scratch, FRAME_HEADER, &got, deadline_ns);
    out[0] = got;
    if (status != LANE_DONE)
        return status;
    uint64_t reply_id, length;
    memcpy(&reply_id, scratch + 8, 8);
    memcpy(&length, scratch + 24, 8);
    if (memcmp(scratch, "KVTE", 4) != 0 || scratch[4] != 1 || scratch[5] != OP_OK ||
        reply_id != request_id || length != (uint64_t)dest_len)
        return LANE_PUNT;
    int64_t received = 0;
    return lane_read(fd, (char *)(intptr_t)dest, dest_len, &received, deadline_ns);
}
