/*
 * A FUSE session on libfuse3's low-level API, served on Node's event loop:
 *   sessionMount(mountpoint, args, dispatch, onEvent)   mount; returns the session handle
 *   sessionClose(session)                               stop serving, unmount if still mounted, free
 *   sessionNotifyInval / sessionWriteBack               (writeback_cache) ask the kernel about the
 *                                                       mount's cache, from fuse_kernel_worker.c's thread
 *   replyErr / replyNone / replyEntry / replyAttr / replyOpen / replyData / replyWrite /
 *   replyStatfs / replyLseek / replyDirents (request id, ...)   answer one request
 *   OP                                                  the request kinds dispatch() receives
 *
 * Threading: none. The /dev/fuse fd is non-blocking and watched by a uv_poll handle on the loop
 * thread; when it is readable, requests are read with fuse_session_receive_buf and handed to
 * fuse_session_process_buf right there, which calls our low-level op, which calls JS once:
 *   dispatch(op, requestId, ino, fh, n1, n2, n3, extra)
 * JS answers later (any order, many in flight) with the reply functions and the request id. A
 * request id is a slot in a table of fuse_req_t plus a generation, so a late or second answer to a
 * request finds its slot free (or reused under another generation) and throws instead of answering
 * someone else's request. At most REQUESTS_PER_WAKEUP requests are taken per wakeup, so a busy
 * kernel queue never holds the loop; the level-triggered poll brings us back on the next turn.
 *
 * Requests that need no JS are answered here: forget (inode numbers are stable for the session's
 * life, JS keeps no lookup counts), releasedir, fsyncdir, flush of directories.
 *
 * Data: the kernel copies each request into a receive buffer (max_write + header = 1 MiB + 4 KiB).
 * Receive buffers come from a pool and are reused; a buffer only leaves the pool when a large write's
 * data is handed to JS without a copy (see session_write). Read replies go from the JS Buffer to the
 * kernel with fuse_reply_buf (one writev, no copy of ours).
 *
 * Events (onEvent(kind, detail)): 'init' once the kernel's INIT is answered (the mount is live),
 * 'exited' when the session ends by itself: unmounted (the fd read fails ENODEV), the connection
 * aborted, or a fatal libfuse error. libfuse's log goes to stderr and into a small buffer, so a
 * failed mount throws with libfuse's own reason.
 */
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include "qcow2fuse.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

/* Requests read and dispatched per wakeup of the loop before yielding to other work. */
#ifndef REQUESTS_PER_WAKEUP
#define REQUESTS_PER_WAKEUP 64
#endif
/* Largest write the kernel sends (so it negotiates max_pages = 256), and the read-ahead offered. */
#define MAX_WRITE_BYTES (1024 * 1024)
#define MAX_READAHEAD_BYTES (1024 * 1024)
/* Asynchronous requests the kernel may have outstanding at once (see session_init). */
#define MAX_BACKGROUND 64
/* Receive buffer: the largest request (a max_write write) plus libfuse's header allowance. */
#define RECEIVE_BUFFER_BYTES (MAX_WRITE_BYTES + 4096)
/* Free receive buffers kept for reuse; more are freed. */
#define POOL_MAX_FREE 16
/*
 * Writes of at least this many bytes reach JS as an external Buffer over the receive buffer itself
 * (no copy; the buffer returns to the pool when JS drops it). Smaller writes are copied into a
 * Buffer of their own size: a 4 KiB write kept by the driver (a partial compressed cluster, a write
 * waiting behind a metadata update) must not pin a 1 MiB receive buffer, and copying 4 KiB costs
 * less than the external Buffer's finalizer.
 */
#define ZERO_COPY_MIN_BYTES (128 * 1024)
/*
 * Writes up to SLAB_WRITE_MAX_BYTES are copied into a slab: a JS Buffer of SLAB_BYTES carved into
 * consecutive pieces (JS sees each write as slab.subarray(offset, offset + size)). A new slab is made
 * when the current one is full; an old one is freed by the GC once no piece of it is referenced. One
 * allocation per 16 small writes instead of one each (malloc of 4 KiB buffers was ~9% of a 4 KiB write
 * request's cost), at the price of a kept piece pinning its slab (16× a 4 KiB piece at most).
 */
#define SLAB_BYTES (64 * 1024)
#define SLAB_WRITE_MAX_BYTES (16 * 1024)
/* Bytes of libfuse log kept for error messages. */
#define LOG_KEEP_BYTES 2048

/* Request kinds passed to dispatch(): the FUSE protocol's opcode numbers. */
enum {
  OP_LOOKUP = 1, OP_GETATTR = 3, OP_SETATTR = 4, OP_SYMLINK = 6, OP_MKNOD = 8, OP_MKDIR = 9, OP_UNLINK = 10,
  OP_RMDIR = 11, OP_RENAME = 12, OP_LINK = 13, OP_OPEN = 14, OP_READ = 15, OP_WRITE = 16, OP_STATFS = 17,
  OP_RELEASE = 18, OP_FSYNC = 20, OP_FLUSH = 25, OP_OPENDIR = 27, OP_READDIR = 28, OP_CREATE = 35,
  OP_FALLOCATE = 43, OP_LSEEK = 46,
};

typedef struct session session_t;
struct session {
  napi_env env;
  struct fuse_session *se;
  uv_poll_t poll;
  bool polling;
  bool closed;
  bool exited_reported;
  bool serving;          /* inside session_on_readable: a close waits for its end */
  bool close_requested;
  bool init_answered;    /* set by session_init (libfuse answers INIT right after it) */
  bool init_reported;
  bool writeback_cache;  /* asked for by the mount (-o writeback_cache) */
  kernel_worker_t *worker; /* with writeback_cache: notifications and write-backs (fuse_kernel_worker.c) */
  struct fuse_buf buf;   /* the current receive buffer (mem from the pool) */
  bool buf_given_away;   /* set by session_write when JS took buf.mem */
  napi_ref slab_ref;     /* the current slab (a JS Buffer), NULL until the first small write */
  uint8_t *slab_data;
  size_t slab_used;
  napi_ref dispatch_ref;
  napi_ref event_ref;
  napi_async_context async_ctx;
  napi_async_cleanup_hook_handle cleanup_hook;
};

/* ------------------------------------------------------------ libfuse log */

static char log_keep[LOG_KEEP_BYTES];
static size_t log_keep_len;

/* libfuse's messages: to stderr (the daemon's log), and the latest ones kept for error messages. */
static void session_log(enum fuse_log_level level, const char *fmt, va_list ap) {
  char line[512];
  vsnprintf(line, sizeof line, fmt, ap);
  fputs(line, stderr);
  size_t n = strlen(line);
  if (n >= LOG_KEEP_BYTES) {
    return;
  }
  if (log_keep_len + n >= LOG_KEEP_BYTES) {
    log_keep_len = 0;
  }
  memcpy(log_keep + log_keep_len, line, n + 1);
  log_keep_len += n;
}

/* The kept log as one line (newlines → "; "), then forgotten. */
static void log_take(char *out, size_t size) {
  size_t j = 0;
  for (size_t i = 0; i < log_keep_len && j + 3 < size; i++) {
    char c = log_keep[i];
    if (c == '\n') {
      if (i + 1 < log_keep_len) {
        out[j++] = ';';
        out[j++] = ' ';
      }
    } else {
      out[j++] = c;
    }
  }
  out[j] = '\0';
  log_keep_len = 0;
}

/* ------------------------------------------------------ receive buffer pool */

static void *pool_free[POOL_MAX_FREE];
static int pool_nb_free;

static void *pool_take(void) {
  return pool_nb_free > 0 ? pool_free[--pool_nb_free] : malloc(RECEIVE_BUFFER_BYTES);
}

static void pool_give(void *mem) {
  if (pool_nb_free < POOL_MAX_FREE) {
    pool_free[pool_nb_free++] = mem;
  } else {
    free(mem);
  }
}

/* Finalizer of a write's external Buffer: its receive buffer goes back to the pool. */
static void pool_finalize(napi_env env, void *data, void *hint) {
  int64_t adjusted;
  pool_give(hint);
  napi_adjust_external_memory(env, -(int64_t)RECEIVE_BUFFER_BYTES, &adjusted);
}

/* ----------------------------------------------------------- request table */

/*
 * A request id is slot + generation * 2^24 (a safe integer): the slot names the table entry, the
 * generation changes each time the slot is reused.
 */
#define SLOT_BITS 24
#define SLOT_SPAN 16777216.0

typedef struct {
  fuse_req_t req;      /* NULL when free */
  session_t *session;
  uint32_t generation;
} request_slot_t;

static request_slot_t *slots;
static uint32_t nb_slots;
static uint32_t *free_slots;
static uint32_t nb_free_slots;

/* Enter a request; returns its id, or -1 when the table cannot grow. */
static double request_add(session_t *s, fuse_req_t req) {
  if (nb_free_slots == 0) {
    uint32_t grown = nb_slots == 0 ? 256 : nb_slots * 2;
    if (grown > (1u << SLOT_BITS)) {
      return -1;
    }
    request_slot_t *more = realloc(slots, grown * sizeof *slots);
    if (more == NULL) {
      return -1;
    }
    slots = more;
    uint32_t *more_free = realloc(free_slots, grown * sizeof *free_slots);
    if (more_free == NULL) {
      return -1;
    }
    free_slots = more_free;
    for (uint32_t i = grown; i > nb_slots; i--) {
      slots[i - 1].req = NULL;
      slots[i - 1].generation = 0;
      free_slots[nb_free_slots++] = i - 1;
    }
    nb_slots = grown;
  }
  uint32_t slot = free_slots[--nb_free_slots];
  slots[slot].req = req;
  slots[slot].session = s;
  slots[slot].generation = (slots[slot].generation + 1) & ((1u << 29) - 1);
  return (double)slots[slot].generation * SLOT_SPAN + (double)slot;
}

static void request_free_slot(uint32_t slot) {
  slots[slot].req = NULL;
  free_slots[nb_free_slots++] = slot;
}

/* Take the request with this id out of the table; NULL when it is not pending. */
static fuse_req_t request_take_id(double id) {
  if (!(id >= 0 && id <= MAX_SAFE_INTEGER)) {
    return NULL;
  }
  uint64_t n = (uint64_t)id;
  uint32_t slot = (uint32_t)(n & ((1u << SLOT_BITS) - 1));
  uint32_t generation = (uint32_t)(n >> SLOT_BITS);
  if (slot >= nb_slots || slots[slot].req == NULL || slots[slot].generation != generation) {
    return NULL;
  }
  fuse_req_t req = slots[slot].req;
  request_free_slot(slot);
  return req;
}

/* Take the request named by a JS id out of the table; NULL (exception thrown) when it is not pending. */
static fuse_req_t request_take(napi_env env, napi_value id_v) {
  double id;
  if (napi_get_value_double(env, id_v, &id) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "request id must be a number");
    return NULL;
  }
  fuse_req_t req = request_take_id(id);
  if (req == NULL) {
    napi_throw_error(env, "EALREADY", "request already answered (or unknown)");
  }
  return req;
}

/* Answer every request of `s` still pending with `err` (before its session goes away). */
static void requests_abort(session_t *s, int err) {
  for (uint32_t slot = 0; slot < nb_slots; slot++) {
    if (slots[slot].req != NULL && slots[slot].session == s) {
      fuse_reply_err(slots[slot].req, err);
      request_free_slot(slot);
    }
  }
}

/* ----------------------------------------------------------- calling JS */

/* Call onEvent(kind, detail, token, errno). */
static void session_event_full(session_t *s, const char *kind, const char *detail, double token, int err) {
  napi_env env = s->env;
  napi_value fn, recv, argv[4], result;
  if (napi_get_reference_value(env, s->event_ref, &fn) != napi_ok || fn == NULL || napi_get_undefined(env, &recv) != napi_ok ||
      napi_create_string_utf8(env, kind, NAPI_AUTO_LENGTH, &argv[0]) != napi_ok ||
      napi_create_string_utf8(env, detail, NAPI_AUTO_LENGTH, &argv[1]) != napi_ok ||
      napi_create_double(env, token, &argv[2]) != napi_ok || napi_create_int32(env, err, &argv[3]) != napi_ok) {
    return;
  }
  if (napi_call_function(env, recv, fn, 4, argv, &result) == napi_pending_exception) {
    napi_value error;
    napi_get_and_clear_last_exception(env, &error);
    napi_fatal_exception(env, error);
  }
}

/* Call onEvent(kind, detail) (token and errno 0). */
static void session_event(session_t *s, const char *kind, const char *detail) {
  session_event_full(s, kind, detail, 0, 0);
}

/*
 * Hand one request to JS: dispatch(op, id, ino, fh, n1, n2, n3, extra). extra may be NULL
 * (undefined). If JS cannot take it (no table room, the call threw), the request is answered `EIO`
 * here so the caller in the kernel never hangs.
 */
static void dispatch(fuse_req_t req, int op, fuse_ino_t ino, uint64_t fh, double n1, double n2, double n3,
                     napi_value extra) {
  session_t *s = fuse_req_userdata(req);
  napi_env env = s->env;
  double id = request_add(s, req);
  if (id < 0) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  napi_value fn, recv, argv[8], result, error;
  if (napi_get_reference_value(env, s->dispatch_ref, &fn) != napi_ok || napi_get_undefined(env, &recv) != napi_ok ||
      napi_create_int32(env, op, &argv[0]) != napi_ok || napi_create_double(env, id, &argv[1]) != napi_ok ||
      napi_create_double(env, (double)ino, &argv[2]) != napi_ok || napi_create_double(env, (double)fh, &argv[3]) != napi_ok ||
      napi_create_double(env, n1, &argv[4]) != napi_ok || napi_create_double(env, n2, &argv[5]) != napi_ok ||
      napi_create_double(env, n3, &argv[6]) != napi_ok ||
      (extra == NULL && napi_get_undefined(env, &extra) != napi_ok)) {
    napi_get_and_clear_last_exception(env, &error);
    fuse_reply_err(request_take_id(id), EIO);
    return;
  }
  argv[7] = extra;
  if (napi_call_function(env, recv, fn, 8, argv, &result) != napi_ok) {
    /* dispatch() catches everything; a throw here is a bug: answer EIO and report it. */
    napi_get_and_clear_last_exception(env, &error);
    fuse_req_t pending = request_take_id(id);
    if (pending != NULL) {
      fuse_reply_err(pending, EIO);
    }
    napi_fatal_exception(env, error);
  }
}

static napi_value js_string(session_t *s, const char *text) {
  napi_value v;
  return napi_create_string_utf8(s->env, text, NAPI_AUTO_LENGTH, &v) == napi_ok ? v : NULL;
}

/* ------------------------------------------------------- low-level ops */

static void session_init(void *userdata, struct fuse_conn_info *conn) {
  session_t *s = userdata;
  s->init_answered = true;
  conn->max_write = MAX_WRITE_BYTES;
  conn->max_readahead = MAX_READAHEAD_BYTES;
  conn->want |= conn->capable & (FUSE_CAP_ASYNC_DIO | FUSE_CAP_ASYNC_READ | FUSE_CAP_ATOMIC_O_TRUNC);
  /*
   * No automatic invalidation: with it, the kernel refreshes the attributes before every read (with
   * our attr_timeout of 0, a GETATTR round trip per read). Cached pages are dropped on open instead
   * (no keep_cache, libfuse 2's behaviour) and by notify_inval_inode where we change data behind them.
   */
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  /*
   * The kernel's writeback cache: small writes land in the page cache and reach us coalesced. fsync,
   * close and unmount still write everything back to us first (the kernel flushes dirty pages before
   * FSYNC, FLUSH and the unmount), so durability stays the daemon's fsync.
   */
  if (s->writeback_cache) {
    conn->want |= conn->capable & FUSE_CAP_WRITEBACK_CACHE;
  }
  /*
   * Asynchronous requests (read-ahead, async direct I/O) the kernel keeps in flight to us: its
   * default of 12 would cap a queue of O_DIRECT requests at 12 however deep the client's queue is.
   */
  conn->max_background = MAX_BACKGROUND;
  conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
}

static uint64_t fh_of(struct fuse_file_info *fi) {
  return fi == NULL ? 0 : fi->fh;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  dispatch(req, OP_LOOKUP, parent, 0, 0, 0, 0, js_string(fuse_req_userdata(req), name));
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
  fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  dispatch(req, OP_GETATTR, ino, fh_of(fi), 0, 0, 0, NULL);
}

static double timespec_ms(const struct timespec *ts) {
  return (double)ts->tv_sec * 1000.0 + (double)ts->tv_nsec / 1e6;
}

/*
 * setattr: n1 = the FUSE_SET_ATTR_* bits to change, n2 = size, n3 = atime (ms), extra = mtime (ms);
 * fh is the handle when the kernel names one (ftruncate), else 0. *_NOW bits mean "now".
 */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
  session_t *s = fuse_req_userdata(req);
  napi_value mtime;
  if (napi_create_double(s->env, timespec_ms(&attr->st_mtim), &mtime) != napi_ok) {
    mtime = NULL;
  }
  dispatch(req, OP_SETATTR, ino, fh_of(fi), (double)to_set, (double)attr->st_size, timespec_ms(&attr->st_atim), mtime);
}

static void op_named(fuse_req_t req, int op, fuse_ino_t parent, const char *name) {
  dispatch(req, op, parent, 0, 0, 0, 0, js_string(fuse_req_userdata(req), name));
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev) {
  op_named(req, OP_MKNOD, parent, name);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) {
  op_named(req, OP_MKDIR, parent, name);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
  op_named(req, OP_UNLINK, parent, name);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) {
  op_named(req, OP_RMDIR, parent, name);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name) {
  op_named(req, OP_SYMLINK, parent, name);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent, const char *newname,
                      unsigned int flags) {
  op_named(req, OP_RENAME, parent, name);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname) {
  op_named(req, OP_LINK, newparent, newname);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
  op_named(req, OP_CREATE, parent, name);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  dispatch(req, OP_OPEN, ino, 0, (double)fi->flags, 0, 0, NULL);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  dispatch(req, OP_READ, ino, fi->fh, (double)size, (double)off, 0, NULL);
}

/*
 * Copy a small write into the session's slab (a new slab when it has no room); the slab Buffer, and
 * the piece's offset in *slab_offset. NULL when no slab can be made.
 */
static napi_value slab_copy(session_t *s, const char *data, size_t size, size_t *slab_offset) {
  napi_env env = s->env;
  napi_value slab;
  if (s->slab_ref == NULL || s->slab_used + size > SLAB_BYTES) {
    void *mem;
    if (napi_create_buffer(env, SLAB_BYTES, &mem, &slab) != napi_ok) {
      return NULL;
    }
    if (s->slab_ref != NULL) {
      napi_delete_reference(env, s->slab_ref);
      s->slab_ref = NULL;
    }
    if (napi_create_reference(env, slab, 1, &s->slab_ref) != napi_ok) {
      return NULL;
    }
    s->slab_data = mem;
    s->slab_used = 0;
  } else if (napi_get_reference_value(env, s->slab_ref, &slab) != napi_ok || slab == NULL) {
    return NULL;
  }
  memcpy(s->slab_data + s->slab_used, data, size);
  *slab_offset = s->slab_used;
  s->slab_used += (size + 63) & ~(size_t)63;
  return slab;
}

/*
 * write: extra = the data, n3 = where it starts in extra. A large write gets an external Buffer over
 * the receive buffer it arrived in — safe because that buffer is then taken out of the pool
 * (buf_given_away: the next request is received into another one) and returns only when JS's Buffer
 * is collected. A small write is copied into the slab (SLAB_BYTES), a middle-sized one into a Buffer
 * of its own (ZERO_COPY_MIN_BYTES explains why).
 */
static void op_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
                     struct fuse_file_info *fi) {
  session_t *s = fuse_req_userdata(req);
  napi_env env = s->env;
  napi_value buffer = NULL;
  size_t start = 0;
  void *copy;
  if (size <= SLAB_WRITE_MAX_BYTES) {
    buffer = slab_copy(s, data, size, &start);
    if (buffer == NULL) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
    }
  }
  const char *base = s->buf.mem;
  bool inside = data >= base && data + size <= base + RECEIVE_BUFFER_BYTES;
  if (size >= ZERO_COPY_MIN_BYTES && inside && !s->buf_given_away) {
    int64_t adjusted;
    if (napi_create_external_buffer(env, size, (void *)data, pool_finalize, s->buf.mem, &buffer) == napi_ok) {
      s->buf_given_away = true;
      napi_adjust_external_memory(env, (int64_t)RECEIVE_BUFFER_BYTES, &adjusted);
    } else {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
      buffer = NULL;
    }
  }
  if (buffer == NULL && napi_create_buffer_copy(env, size, data, &copy, &buffer) != napi_ok) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  dispatch(req, OP_WRITE, ino, fi->fh, (double)size, (double)off, (double)start, buffer);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  dispatch(req, OP_FLUSH, ino, fi->fh, 0, 0, 0, NULL);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  dispatch(req, OP_RELEASE, ino, fi->fh, 0, 0, 0, NULL);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  dispatch(req, OP_FSYNC, ino, fi->fh, (double)datasync, 0, 0, NULL);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  dispatch(req, OP_OPENDIR, ino, 0, (double)fi->flags, 0, 0, NULL);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  dispatch(req, OP_READDIR, ino, fi->fh, (double)size, (double)off, 0, NULL);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  fuse_reply_err(req, 0);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
  dispatch(req, OP_STATFS, ino, 0, 0, 0, 0, NULL);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi) {
  dispatch(req, OP_FALLOCATE, ino, fi->fh, (double)mode, (double)offset, (double)length, NULL);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi) {
  dispatch(req, OP_LSEEK, ino, fi->fh, (double)off, (double)whence, 0, NULL);
}

static const struct fuse_lowlevel_ops session_ops = {
    .init = session_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .mknod = op_mknod,
    .mkdir = op_mkdir,
    .unlink = op_unlink,
    .rmdir = op_rmdir,
    .symlink = op_symlink,
    .rename = op_rename,
    .link = op_link,
    .create = op_create,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .releasedir = op_releasedir,
    .fsyncdir = op_fsyncdir,
    .statfs = op_statfs,
    .fallocate = op_fallocate,
    .lseek = op_lseek,
};

/* ------------------------------------------------------------- the loop */

static void session_stop_polling(session_t *s) {
  if (s->polling) {
    uv_poll_stop(&s->poll);
    s->polling = false;
  }
}

/* The session ended by itself (unmounted, aborted, fatal): stop reading and tell JS once. */
static void session_ended(session_t *s, const char *why) {
  session_stop_polling(s);
  if (!s->exited_reported) {
    s->exited_reported = true;
    session_event(s, "exited", why);
  }
}

/* Receive and dispatch up to REQUESTS_PER_WAKEUP requests (inside the caller's callback scope). */
static void session_serve(session_t *s) {
  for (int n = 0; n < REQUESTS_PER_WAKEUP && !s->close_requested; n++) {
    if (s->buf.mem == NULL || s->buf_given_away) {
      s->buf.mem = pool_take();
      s->buf_given_away = false;
      if (s->buf.mem == NULL) {
        return; /* out of memory: try again on the next wakeup */
      }
    }
    s->buf.size = RECEIVE_BUFFER_BYTES;
    int res = fuse_session_receive_buf(s->se, &s->buf);
    if (res == -EAGAIN || res == -EINTR) {
      return;
    }
    if (res <= 0 || fuse_session_exited(s->se)) {
      session_ended(s, res == 0 ? "unmounted" : strerror(-res));
      return;
    }
    fuse_session_process_buf(s->se, &s->buf);
    if (s->close_requested) {
      return;
    }
    if (fuse_session_exited(s->se)) {
      char reason[LOG_KEEP_BYTES];
      log_take(reason, sizeof reason);
      session_ended(s, reason[0] != '\0' ? reason : "libfuse ended the session");
      return;
    }
    if (s->init_answered && !s->init_reported) {
      s->init_reported = true;
      session_event(s, "init", "");
    }
  }
}

static void session_teardown(session_t *s);

static void session_on_readable(uv_poll_t *handle, int status, int events) {
  session_t *s = handle->data;
  napi_env env = s->env;
  napi_handle_scope scope;
  napi_callback_scope callback_scope;
  napi_value resource;
  if (napi_open_handle_scope(env, &scope) != napi_ok) {
    return;
  }
  if (napi_create_object(env, &resource) == napi_ok &&
      napi_open_callback_scope(env, resource, s->async_ctx, &callback_scope) == napi_ok) {
    s->serving = true;
    if (status < 0) {
      session_ended(s, uv_strerror(status));
    } else {
      session_serve(s);
    }
    s->serving = false;
    if (s->close_requested) {
      session_teardown(s);
    }
    napi_close_callback_scope(env, callback_scope);
  }
  napi_close_handle_scope(env, scope);
}

/* ------------------------------------------------------------ lifecycle */

static void session_free(session_t *s) {
  if (s->buf.mem != NULL && !s->buf_given_away) {
    pool_give(s->buf.mem);
  }
  free(s);
}

static void session_poll_closed(uv_handle_t *handle) {
  session_free(handle->data);
}

/*
 * Stop serving and let go of everything: pending requests are answered EIO, the mount is detached if
 * still there (libfuse: a lazy unmount, only when the fd shows it mounted), the fd closed.
 */
static void session_teardown(session_t *s) {
  s->close_requested = true;
  if (s->closed || s->serving) {
    return;
  }
  s->closed = true;
  session_stop_polling(s);
  if (s->worker != NULL) {
    kernel_worker_stop(s->worker);
    s->worker = NULL;
  }
  requests_abort(s, EIO);
  fuse_session_unmount(s->se);
  fuse_session_destroy(s->se);
  s->se = NULL;
  napi_delete_reference(s->env, s->dispatch_ref);
  napi_delete_reference(s->env, s->event_ref);
  if (s->slab_ref != NULL) {
    napi_delete_reference(s->env, s->slab_ref);
    s->slab_ref = NULL;
  }
  napi_async_destroy(s->env, s->async_ctx);
  uv_close((uv_handle_t *)&s->poll, session_poll_closed);
}

/* A write-back of the kernel worker ended: onEvent('written-back', '', token, errno) on the loop thread. */
static void session_written_back(void *ctx, double token, int err) {
  session_t *s = ctx;
  napi_env env = s->env;
  napi_handle_scope scope;
  napi_callback_scope callback_scope;
  napi_value resource;
  if (s->closed || napi_open_handle_scope(env, &scope) != napi_ok) {
    return;
  }
  if (napi_create_object(env, &resource) == napi_ok &&
      napi_open_callback_scope(env, resource, s->async_ctx, &callback_scope) == napi_ok) {
    session_event_full(s, "written-back", "", token, err);
    napi_close_callback_scope(env, callback_scope);
  }
  napi_close_handle_scope(env, scope);
}

static void session_cleanup(napi_async_cleanup_hook_handle hook, void *arg) {
  session_t *s = arg;
  s->cleanup_hook = NULL;
  session_teardown(s);
  napi_remove_async_cleanup_hook(hook);
}

/* The argv libfuse parses: "qcow2fuse" then the JS strings (e.g. "-o", "ro,allow_other"). */
static char **mount_argv(napi_env env, napi_value array, int *argc) {
  uint32_t length;
  if (napi_get_array_length(env, array, &length) != napi_ok || length > 64) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "args must be an array of at most 64 strings");
    return NULL;
  }
  char **argv = calloc(length + 2, sizeof *argv);
  if (argv == NULL) {
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  argv[0] = strdup("qcow2fuse");
  for (uint32_t i = 0; i < length; i++) {
    napi_value item;
    size_t bytes;
    if (napi_get_element(env, array, i, &item) != napi_ok || napi_get_value_string_utf8(env, item, NULL, 0, &bytes) != napi_ok) {
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "args must be strings");
      *argc = (int)i + 1;
      return argv;
    }
    argv[i + 1] = malloc(bytes + 1);
    if (argv[i + 1] != NULL) {
      napi_get_value_string_utf8(env, item, argv[i + 1], bytes + 1, &bytes);
    }
  }
  *argc = (int)length + 1;
  return argv;
}

static void free_argv(char **argv, int argc) {
  for (int i = 0; i < argc; i++) {
    free(argv[i]);
  }
  free(argv);
}

/* Throw a mount failure with libfuse's own words (its kept log), else `fallback`. */
static void throw_mount_error(napi_env env, const char *code, const char *fallback) {
  char reason[LOG_KEEP_BYTES];
  log_take(reason, sizeof reason);
  napi_value error = make_coded_error(env, code, reason[0] != '\0' ? reason : fallback);
  if (error != NULL) {
    napi_throw(env, error);
  }
}

/* Create and mount the libfuse session; NULL with an exception pending. */
static struct fuse_session *session_create(napi_env env, napi_value args_v, const char *mountpoint, session_t *s) {
  int argc = 0;
  char **argv = mount_argv(env, args_v, &argc);
  if (argv == NULL) {
    return NULL;
  }
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  struct fuse_session *se = NULL;
  if (!pending) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    log_keep_len = 0;
    fuse_set_log_func(session_log);
    se = fuse_session_new(&args, &session_ops, sizeof session_ops, s);
    fuse_opt_free_args(&args);
    if (se == NULL) {
      throw_mount_error(env, "EINVAL", "libfuse refused the session options");
    } else if (fuse_session_mount(se, mountpoint) != 0) {
      throw_mount_error(env, "EIO", "fuse_session_mount failed");
      fuse_session_destroy(se);
      se = NULL;
    }
  }
  free_argv(argv, argc);
  return se;
}

/*
 * sessionMount(mountpoint, args, dispatch, onEvent, writebackCache) -> session. Mounts (the kernel's
 * INIT arrives once the loop runs: onEvent('init') says the mount is live) and starts serving.
 * writebackCache asks the kernel to cache writes (FUSE_CAP_WRITEBACK_CACHE) where it can. Throws with
 * libfuse's reason when it cannot mount.
 */
static napi_value js_session_mount(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  char mountpoint[4096];
  size_t mp_bytes;
  bool writeback_cache;
  if (!get_args(env, info, 5, argv)) {
    return NULL;
  }
  if (napi_get_value_bool(env, argv[4], &writeback_cache) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "writebackCache must be a boolean");
    return NULL;
  }
  if (napi_get_value_string_utf8(env, argv[0], mountpoint, sizeof mountpoint, &mp_bytes) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "mountpoint must be a string");
    return NULL;
  }
  session_t *s = calloc(1, sizeof *s);
  if (s == NULL) {
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  s->env = env;
  s->writeback_cache = writeback_cache;
  s->se = session_create(env, argv[1], mountpoint, s);
  if (s->se == NULL) {
    free(s);
    return NULL;
  }
  int fd = fuse_session_fd(s->se);
  uv_loop_t *loop;
  napi_value name, external;
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0 || napi_get_uv_event_loop(env, &loop) != napi_ok ||
      uv_poll_init(loop, &s->poll, fd) != 0) {
    int err = errno;
    fuse_session_unmount(s->se);
    fuse_session_destroy(s->se);
    free(s);
    throw_errno(env, err, "uv_poll_init(/dev/fuse)");
    return NULL;
  }
  s->poll.data = s;
  if (writeback_cache && (s->worker = kernel_worker_start(loop, fd, mountpoint, session_written_back, s)) == NULL) {
    fuse_session_unmount(s->se);
    fuse_session_destroy(s->se);
    free(s);
    throw_errno(env, ENOMEM, "kernel_worker_start");
    return NULL;
  }
  NAPI_CALL(env, napi_create_reference(env, argv[2], 1, &s->dispatch_ref));
  NAPI_CALL(env, napi_create_reference(env, argv[3], 1, &s->event_ref));
  NAPI_CALL(env, napi_create_string_utf8(env, "qcow2fuse:fuse-session", NAPI_AUTO_LENGTH, &name));
  NAPI_CALL(env, napi_async_init(env, NULL, name, &s->async_ctx));
  NAPI_CALL(env, napi_add_async_cleanup_hook(env, session_cleanup, s, &s->cleanup_hook));
  uv_poll_start(&s->poll, UV_READABLE, session_on_readable);
  s->polling = true;
  NAPI_CALL(env, napi_create_external(env, s, NULL, NULL, &external));
  return external;
}

static session_t *get_session(napi_env env, napi_value value) {
  session_t *s = NULL;
  if (napi_get_value_external(env, value, (void **)&s) != napi_ok || s == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "not a FUSE session");
    return NULL;
  }
  return s;
}

/* sessionClose(session): stop serving, answer what is pending EIO, unmount if mounted, free. Idempotent. */
static napi_value js_session_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  session_t *s;
  if (!get_args(env, info, 1, argv) || (s = get_session(env, argv[0])) == NULL) {
    return NULL;
  }
  if (!s->closed && s->cleanup_hook != NULL) {
    napi_remove_async_cleanup_hook(s->cleanup_hook);
    s->cleanup_hook = NULL;
  }
  session_teardown(s);
  return NULL;
}

/*
 * sessionNotifyInval(session, ino, offset, length) -> queued: drop the kernel's cached pages of ino in
 * [offset, offset + length) once they are written back (length 0: to the end), from the kernel worker
 * (never this thread: fuse_kernel_worker.c says why). False when the session has no worker (no
 * writeback_cache) or is closed.
 */
static napi_value js_session_notify_inval(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  session_t *s;
  int64_t ino, offset, length;
  if (!get_args(env, info, 4, argv) || (s = get_session(env, argv[0])) == NULL || !get_safe_uint(env, argv[1], "ino", &ino) ||
      !get_safe_uint(env, argv[2], "offset", &offset) || !get_safe_uint(env, argv[3], "length", &length)) {
    return NULL;
  }
  bool queued = !s->closed && s->worker != NULL && kernel_worker_inval(s->worker, (uint64_t)ino, offset, length);
  napi_value v;
  NAPI_CALL(env, napi_get_boolean(env, queued, &v));
  return v;
}

/*
 * sessionWriteBack(session, path, offset, token) -> queued: write the kernel's dirty pages of the
 * mount's file `path` (e.g. "/disk.raw") from offset to the end back to us; onEvent('written-back',
 * '', token, errno) follows once they are. False when the session has no worker or is closed.
 */
static napi_value js_session_write_back(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  session_t *s;
  char path[1024];
  int64_t offset;
  double token;
  if (!get_args(env, info, 4, argv) || (s = get_session(env, argv[0])) == NULL ||
      !get_short_string(env, argv[1], "path", path, sizeof path) || !get_safe_uint(env, argv[2], "offset", &offset) ||
      napi_get_value_double(env, argv[3], &token) != napi_ok) {
    return NULL;
  }
  bool queued = !s->closed && s->worker != NULL && kernel_worker_write_back(s->worker, path, offset, token);
  napi_value v;
  NAPI_CALL(env, napi_get_boolean(env, queued, &v));
  return v;
}

/* ------------------------------------------------------------- replies */

/* Report a failed fuse_reply_* (the kernel refused the answer: the request was interrupted, the mount is gone). */
static napi_value reply_result(napi_env env, int res) {
  napi_value v;
  NAPI_CALL(env, napi_create_int32(env, res, &v));
  return v;
}

/* replyErr(id, errno) — errno positive, 0 for success without data. */
static napi_value js_reply_err(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int err;
  fuse_req_t req;
  if (!get_args(env, info, 2, argv) || !get_small_int(env, argv[1], "errno", &err) || (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  return reply_result(env, fuse_reply_err(req, err));
}

/* Fill a struct stat from JS numbers: ino, mode, nlink, uid, gid, size, blocks, blksize, atimeMs, mtimeMs, ctimeMs. */
static bool get_stat(napi_env env, const napi_value *v, struct stat *st) {
  double n[11];
  for (int i = 0; i < 11; i++) {
    if (napi_get_value_double(env, v[i], &n[i]) != napi_ok) {
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "stat fields must be numbers");
      return false;
    }
  }
  memset(st, 0, sizeof *st);
  st->st_ino = (ino_t)n[0];
  st->st_mode = (mode_t)n[1];
  st->st_nlink = (nlink_t)n[2];
  st->st_uid = (uid_t)n[3];
  st->st_gid = (gid_t)n[4];
  st->st_size = (off_t)n[5];
  st->st_blocks = (blkcnt_t)n[6];
  st->st_blksize = (blksize_t)n[7];
  struct timespec *times[3] = {&st->st_atim, &st->st_mtim, &st->st_ctim};
  for (int i = 0; i < 3; i++) {
    double ms = n[8 + i];
    times[i]->tv_sec = (time_t)(ms / 1000.0);
    times[i]->tv_nsec = (long)((ms - (double)times[i]->tv_sec * 1000.0) * 1e6);
    if (times[i]->tv_nsec < 0) {
      times[i]->tv_nsec = 0;
    }
  }
  return true;
}

/* replyAttr(id, timeout, ino, mode, nlink, uid, gid, size, blocks, blksize, atimeMs, mtimeMs, ctimeMs) */
static napi_value js_reply_attr(napi_env env, napi_callback_info info) {
  napi_value argv[13];
  double timeout;
  struct stat st;
  fuse_req_t req;
  if (!get_args(env, info, 13, argv) || napi_get_value_double(env, argv[1], &timeout) != napi_ok ||
      !get_stat(env, argv + 2, &st) || (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  return reply_result(env, fuse_reply_attr(req, &st, timeout));
}

/* replyEntry(id, entryTimeout, attrTimeout, ino, mode, nlink, uid, gid, size, blocks, blksize, atimeMs, mtimeMs, ctimeMs) */
static napi_value js_reply_entry(napi_env env, napi_callback_info info) {
  napi_value argv[14];
  struct fuse_entry_param e;
  fuse_req_t req;
  memset(&e, 0, sizeof e);
  if (!get_args(env, info, 14, argv) || napi_get_value_double(env, argv[1], &e.entry_timeout) != napi_ok ||
      napi_get_value_double(env, argv[2], &e.attr_timeout) != napi_ok || !get_stat(env, argv + 3, &e.attr) ||
      (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  e.ino = e.attr.st_ino;
  return reply_result(env, fuse_reply_entry(req, &e));
}

/* replyOpen(id, fh, directIo, keepCache) */
static napi_value js_reply_open(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t fh;
  bool direct_io, keep_cache;
  fuse_req_t req;
  if (!get_args(env, info, 4, argv) || !get_safe_uint(env, argv[1], "fh", &fh) ||
      napi_get_value_bool(env, argv[2], &direct_io) != napi_ok || napi_get_value_bool(env, argv[3], &keep_cache) != napi_ok ||
      (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  struct fuse_file_info fi;
  memset(&fi, 0, sizeof fi);
  fi.fh = (uint64_t)fh;
  fi.direct_io = direct_io;
  fi.keep_cache = keep_cache;
  return reply_result(env, fuse_reply_open(req, &fi));
}

/* replyData(id, buffer, length): the first `length` bytes of buffer, straight from its memory. */
static napi_value js_reply_data(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  uint8_t *data;
  size_t bytes;
  int64_t length;
  fuse_req_t req;
  if (!get_args(env, info, 3, argv) || !get_bytes(env, argv[1], "buffer", &data, &bytes) ||
      !get_safe_uint(env, argv[2], "length", &length) || (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  return reply_result(env, fuse_reply_buf(req, (const char *)data, (size_t)length < bytes ? (size_t)length : bytes));
}

/* replyWrite(id, count) */
static napi_value js_reply_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t count;
  fuse_req_t req;
  if (!get_args(env, info, 2, argv) || !get_safe_uint(env, argv[1], "count", &count) || (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  return reply_result(env, fuse_reply_write(req, (size_t)count));
}

/* replyLseek(id, offset) */
static napi_value js_reply_lseek(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t offset;
  fuse_req_t req;
  if (!get_args(env, info, 2, argv) || !get_safe_uint(env, argv[1], "offset", &offset) ||
      (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  return reply_result(env, fuse_reply_lseek(req, (off_t)offset));
}

/* replyStatfs(id, bsize, frsize, blocks, bfree, bavail, files, ffree, favail, fsid, flag, namemax) */
static napi_value js_reply_statfs(napi_env env, napi_callback_info info) {
  napi_value argv[12];
  double n[11];
  fuse_req_t req;
  if (!get_args(env, info, 12, argv)) {
    return NULL;
  }
  for (int i = 0; i < 11; i++) {
    if (napi_get_value_double(env, argv[i + 1], &n[i]) != napi_ok) {
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "statfs fields must be numbers");
      return NULL;
    }
  }
  if ((req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  struct statvfs st;
  memset(&st, 0, sizeof st);
  st.f_bsize = (unsigned long)n[0];
  st.f_frsize = (unsigned long)n[1];
  st.f_blocks = (fsblkcnt_t)n[2];
  st.f_bfree = (fsblkcnt_t)n[3];
  st.f_bavail = (fsblkcnt_t)n[4];
  st.f_files = (fsfilcnt_t)n[5];
  st.f_ffree = (fsfilcnt_t)n[6];
  st.f_favail = (fsfilcnt_t)n[7];
  st.f_fsid = (unsigned long)n[8];
  st.f_flag = (unsigned long)n[9];
  st.f_namemax = (unsigned long)n[10];
  return reply_result(env, fuse_reply_statfs(req, &st));
}

/*
 * replyDirents(id, size, offset, names, inos, modes): the entries from index `offset` on that fit in
 * `size` bytes; entry i carries offset i + 1 (where the next readdir resumes).
 */
static napi_value js_reply_dirents(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int64_t size, offset;
  uint32_t count;
  fuse_req_t req;
  if (!get_args(env, info, 6, argv) || !get_safe_uint(env, argv[1], "size", &size) ||
      !get_safe_uint(env, argv[2], "offset", &offset) || napi_get_array_length(env, argv[3], &count) != napi_ok) {
    return NULL;
  }
  if (size > 1 << 20) {
    size = 1 << 20;
  }
  char *buf = malloc((size_t)size + 1);
  if (buf == NULL) {
    throw_errno(env, ENOMEM, "malloc");
    return NULL;
  }
  size_t used = 0;
  for (uint32_t i = (uint32_t)offset; i < count; i++) {
    napi_value name_v, ino_v, mode_v;
    char name[256];
    size_t name_bytes;
    double ino, mode;
    if (napi_get_element(env, argv[3], i, &name_v) != napi_ok || napi_get_element(env, argv[4], i, &ino_v) != napi_ok ||
        napi_get_element(env, argv[5], i, &mode_v) != napi_ok ||
        napi_get_value_string_utf8(env, name_v, name, sizeof name, &name_bytes) != napi_ok ||
        napi_get_value_double(env, ino_v, &ino) != napi_ok || napi_get_value_double(env, mode_v, &mode) != napi_ok) {
      free(buf);
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "names must be strings, inos and modes numbers");
      return NULL;
    }
    struct stat st;
    memset(&st, 0, sizeof st);
    st.st_ino = (ino_t)ino;
    st.st_mode = (mode_t)mode;
    size_t entry = fuse_add_direntry(NULL, NULL, 0, name, NULL, 0);
    if (used + entry > (size_t)size) {
      break;
    }
    fuse_add_direntry(NULL, buf + used, (size_t)size - used, name, &st, (off_t)i + 1);
    used += entry;
  }
  if ((req = request_take(env, argv[0])) == NULL) {
    free(buf);
    return NULL;
  }
  int res = fuse_reply_buf(req, buf, used);
  free(buf);
  return reply_result(env, res);
}

/* replyNone(id): for requests that take no answer. */
static napi_value js_reply_none(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  fuse_req_t req;
  if (!get_args(env, info, 1, argv) || (req = request_take(env, argv[0])) == NULL) {
    return NULL;
  }
  fuse_reply_none(req);
  return NULL;
}

/* ----------------------------------------------------------- registration */

static bool define_ops(napi_env env, napi_value exports) {
  static const struct { const char *name; int32_t op; } ops[] = {
      {"LOOKUP", OP_LOOKUP}, {"GETATTR", OP_GETATTR}, {"SETATTR", OP_SETATTR}, {"SYMLINK", OP_SYMLINK},
      {"MKNOD", OP_MKNOD}, {"MKDIR", OP_MKDIR}, {"UNLINK", OP_UNLINK}, {"RMDIR", OP_RMDIR},
      {"RENAME", OP_RENAME}, {"LINK", OP_LINK}, {"OPEN", OP_OPEN}, {"READ", OP_READ},
      {"WRITE", OP_WRITE}, {"STATFS", OP_STATFS}, {"RELEASE", OP_RELEASE}, {"FSYNC", OP_FSYNC},
      {"FLUSH", OP_FLUSH}, {"OPENDIR", OP_OPENDIR}, {"READDIR", OP_READDIR}, {"CREATE", OP_CREATE},
      {"FALLOCATE", OP_FALLOCATE}, {"LSEEK", OP_LSEEK},
  };
  napi_value object;
  if (napi_create_object(env, &object) != napi_ok) {
    return false;
  }
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
    if (!set_int_property(env, object, ops[i].name, ops[i].op)) {
      return false;
    }
  }
  return set_int_property(env, object, "MAX_WRITE_BYTES", MAX_WRITE_BYTES) &&
         napi_set_named_property(env, exports, "FUSE_OP", object) == napi_ok;
}

bool register_fuse_session(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"sessionMount", NULL, js_session_mount, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sessionClose", NULL, js_session_close, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sessionNotifyInval", NULL, js_session_notify_inval, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sessionWriteBack", NULL, js_session_write_back, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyErr", NULL, js_reply_err, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyNone", NULL, js_reply_none, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyAttr", NULL, js_reply_attr, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyEntry", NULL, js_reply_entry, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyOpen", NULL, js_reply_open, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyData", NULL, js_reply_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyWrite", NULL, js_reply_write, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyLseek", NULL, js_reply_lseek, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyStatfs", NULL, js_reply_statfs, NULL, NULL, NULL, napi_enumerable, NULL},
      {"replyDirents", NULL, js_reply_dirents, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (!define_functions(env, exports, functions, sizeof functions / sizeof functions[0]) || !define_ops(env, exports)) {
    throw_napi_failure(env, "cannot register the FUSE session");
    return false;
  }
  return true;
}
