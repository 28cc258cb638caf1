/*
 * A pool of our own threads doing pread/pwrite, completions delivered on the event loop in batches
 * (QEMU's aio=threads, for buffered files and O_DIRECT files without Linux AIO):
 *   threadIoCreate(nbThreads, capacity, outSlots, outResults, onComplete)  the pool
 *   threadIoSubmit(handle, slot, write, fd, view, offset)                   queue one pread/pwrite
 *   preadNowait(fd, view, offset)                                           page-cache hit inline
 */
#include "qcow2fuse.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>

/*
 * Why not libuv's threadpool (fs.read/fs.write): it has 4 threads shared with every other job
 * (compression, fs calls), and each request comes back to JS through its own callback and request
 * object. Here requests go to a FIFO served by the pool's threads; a finished request is put on a
 * completion list and the eventfd watched by the loop is signalled, and the loop hands every
 * completion collected so far to JS in one call (results in JS-provided arrays, as aio.c does).
 *
 * JS owns the slots: a slot (0 .. capacity-1) names one request from submit to completion and is
 * reused only after its completion was delivered; JS keeps the buffer alive meanwhile. A result is
 * the byte count of one pread/pwrite call (short reads and writes are the caller's to continue) or
 * -errno.
 */

typedef struct {
  bool write;
  int fd;
  uint8_t *data;
  size_t bytes;
  int64_t offset;
  double result;
} tio_request_t;

typedef struct tio_state tio_state_t;
struct tio_state {
  napi_env env;
  uint32_t capacity;
  tio_request_t *requests; /* one per slot */
  /* Under lock: FIFO of submitted slots, list of completed slots, stop flag. */
  pthread_mutex_t lock;
  pthread_cond_t work_ready;
  uint32_t *queue;
  uint32_t queue_head, nb_queued;
  uint32_t *done;
  uint32_t nb_done;
  uint32_t nb_idle_threads;
  bool stopping;
  /* Loop thread only. */
  uint32_t nb_in_flight;
  int nb_threads;
  pthread_t *threads;
  int event_fd;
  uv_poll_t poll;
  int32_t *out_slots;
  double *out_results;
  completion_sink_t sink;
  napi_async_cleanup_hook_handle cleanup_hook;
};

/* Run one request (pool thread). */
static void tio_execute(tio_request_t *r) {
  ssize_t n;
  do {
    n = r->write ? pwrite(r->fd, r->data, r->bytes, r->offset) : pread(r->fd, r->data, r->bytes, r->offset);
  } while (n < 0 && errno == EINTR);
  r->result = n < 0 ? -(double)errno : (double)n;
}

/* A pool thread: take the oldest queued request, run it, report it; until stopping. */
static void *tio_thread(void *arg) {
  tio_state_t *s = arg;
  pthread_mutex_lock(&s->lock);
  for (;;) {
    while (s->nb_queued == 0 && !s->stopping) {
      s->nb_idle_threads++;
      pthread_cond_wait(&s->work_ready, &s->lock);
      s->nb_idle_threads--;
    }
    if (s->nb_queued == 0) {
      break; /* stopping, and nothing left to run */
    }
    uint32_t slot = s->queue[s->queue_head];
    s->queue_head = (s->queue_head + 1) % s->capacity;
    s->nb_queued--;
    pthread_mutex_unlock(&s->lock);
    tio_execute(&s->requests[slot]);
    pthread_mutex_lock(&s->lock);
    bool signal_loop = s->nb_done == 0; /* the loop has been told already otherwise */
    s->done[s->nb_done++] = slot;
    if (signal_loop) {
      uint64_t one = 1;
      while (write(s->event_fd, &one, sizeof one) < 0 && errno == EINTR) {
      }
    }
  }
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

/* Keep the event loop alive exactly while requests are in flight. */
static void tio_update_ref(tio_state_t *s) {
  if (s->nb_in_flight > 0) {
    uv_ref((uv_handle_t *)&s->poll);
  } else {
    uv_unref((uv_handle_t *)&s->poll);
  }
}

/* The eventfd fired: move every completion to JS, one call per batch. */
static void tio_on_event(uv_poll_t *handle, int status, int events) {
  tio_state_t *s = handle->data;
  uint64_t signalled;
  while (read(s->event_fd, &signalled, sizeof signalled) < 0 && errno == EINTR) {
  }
  pthread_mutex_lock(&s->lock);
  uint32_t count = s->nb_done;
  for (uint32_t i = 0; i < count; i++) {
    uint32_t slot = s->done[i];
    s->out_slots[i] = (int32_t)slot;
    s->out_results[i] = s->requests[slot].result;
  }
  s->nb_done = 0;
  pthread_mutex_unlock(&s->lock);
  if (count == 0) {
    return;
  }
  s->nb_in_flight -= count;
  tio_update_ref(s);
  completion_sink_deliver(s->env, &s->sink, count);
}

/* Stop and join the threads (each finishes what was queued), then free everything. */
static void tio_free(tio_state_t *s) {
  if (s->threads != NULL) {
    pthread_mutex_lock(&s->lock);
    s->stopping = true;
    pthread_cond_broadcast(&s->work_ready);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < s->nb_threads; i++) {
      pthread_join(s->threads[i], NULL);
    }
  }
  pthread_mutex_destroy(&s->lock);
  pthread_cond_destroy(&s->work_ready);
  if (s->event_fd >= 0) {
    close(s->event_fd);
  }
  free(s->threads);
  free(s->requests);
  free(s->queue);
  free(s->done);
  free(s);
}

static void tio_handle_closed(uv_handle_t *handle) {
  tio_state_t *s = handle->data;
  napi_env env = s->env;
  completion_sink_release(env, &s->sink);
  napi_async_cleanup_hook_handle hook = s->cleanup_hook;
  tio_free(s);
  napi_remove_async_cleanup_hook(hook);
}

/* Environment teardown: stop watching the eventfd, then stop the threads. */
static void tio_cleanup(napi_async_cleanup_hook_handle hook, void *arg) {
  tio_state_t *s = arg;
  uv_poll_stop(&s->poll);
  uv_close((uv_handle_t *)&s->poll, tio_handle_closed);
}

/* Free the state of a pool that failed to start, once its poll handle is closed. */
static void tio_free_on_close(uv_handle_t *handle) {
  tio_free(handle->data);
}

/* Start the pool's threads with every signal blocked (signals belong to the main thread). */
static int tio_start_threads(tio_state_t *s, int nb_threads) {
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 64 * 1024);
  int err = 0;
  for (int i = 0; i < nb_threads; i++) {
    err = pthread_create(&s->threads[i], &attr, tio_thread, s);
    if (err != 0) {
      break;
    }
    s->nb_threads++;
  }
  pthread_attr_destroy(&attr);
  pthread_sigmask(SIG_SETMASK, &previous, NULL);
  return err;
}

/* Allocate the state's arrays and synchronisation; false (state freeable) on failure. */
static bool tio_alloc(tio_state_t *s, uint32_t capacity) {
  s->event_fd = -1;
  s->capacity = capacity;
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->work_ready, NULL);
  s->requests = calloc(capacity, sizeof *s->requests);
  s->queue = calloc(capacity, sizeof *s->queue);
  s->done = calloc(capacity, sizeof *s->done);
  return s->requests != NULL && s->queue != NULL && s->done != NULL;
}

/*
 * threadIoCreate(nbThreads, capacity, outSlots: Int32Array, outResults: Float64Array,
 * onComplete(count)) -> handle. Throws the pthread_create/eventfd errno error when it cannot start.
 */
static napi_value js_thread_io_create(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int nb_threads, capacity;
  void *out_slots, *out_results;
  napi_valuetype callback_type;
  if (!get_args(env, info, 5, argv) || !get_small_int(env, argv[0], "nbThreads", &nb_threads) ||
      !get_small_int(env, argv[1], "capacity", &capacity)) {
    return NULL;
  }
  if (nb_threads < 1 || nb_threads > 256 || capacity < 1 || capacity > 4096) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "nbThreads must be 1..256 and capacity 1..4096");
    return NULL;
  }
  if (!get_typed_array(env, argv[2], napi_int32_array, (size_t)capacity, "outSlots", &out_slots) ||
      !get_typed_array(env, argv[3], napi_float64_array, (size_t)capacity, "outResults", &out_results)) {
    return NULL;
  }
  if (napi_typeof(env, argv[4], &callback_type) != napi_ok || callback_type != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "onComplete must be a function");
    return NULL;
  }
  tio_state_t *s = calloc(1, sizeof *s);
  if (s == NULL) {
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  s->env = env;
  s->out_slots = out_slots;
  s->out_results = out_results;
  if (!tio_alloc(s, (uint32_t)capacity)) {
    tio_free(s);
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  s->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (s->event_fd < 0) {
    int err = errno;
    tio_free(s);
    throw_errno(env, err, "eventfd");
    return NULL;
  }
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &s->poll, s->event_fd) != 0) {
    tio_free(s);
    throw_napi_failure(env, "cannot watch the thread pool's eventfd");
    return NULL;
  }
  s->threads = calloc((size_t)nb_threads, sizeof *s->threads);
  int err = s->threads == NULL ? ENOMEM : tio_start_threads(s, nb_threads);
  if (err != 0) {
    s->poll.data = s;
    uv_close((uv_handle_t *)&s->poll, tio_free_on_close);
    throw_errno(env, err, "pthread_create");
    return NULL;
  }
  napi_value external;
  s->poll.data = s;
  uv_poll_start(&s->poll, UV_READABLE, tio_on_event);
  uv_unref((uv_handle_t *)&s->poll);
  if (!completion_sink_init(env, &s->sink, argv[2], argv[3], argv[4], "qcow2fuse:threadio")) {
    throw_napi_failure(env, "cannot hold the completion callback");
    return NULL;
  }
  NAPI_CALL(env, napi_add_async_cleanup_hook(env, tio_cleanup, s, &s->cleanup_hook));
  NAPI_CALL(env, napi_create_external(env, s, NULL, NULL, &external));
  return external;
}

/*
 * threadIoSubmit(handle, slot, write, fd, view, offset): queue one pread (write false) or pwrite of
 * `view` at `offset`; a pool thread runs it. The slot must be free.
 */
static napi_value js_thread_io_submit(napi_env env, napi_callback_info info) {
  io_submit_args_t a;
  if (!get_io_submit_args(env, info, "a thread pool", &a)) {
    return NULL;
  }
  tio_state_t *s = a.handle;
  if ((uint32_t)a.slot >= s->capacity || s->nb_in_flight >= s->capacity) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "slot out of range");
    return NULL;
  }
  tio_request_t *r = &s->requests[a.slot];
  r->write = a.write;
  r->fd = a.fd;
  r->data = a.data;
  r->bytes = a.bytes;
  r->offset = a.offset;
  pthread_mutex_lock(&s->lock);
  s->queue[(s->queue_head + s->nb_queued) % s->capacity] = (uint32_t)a.slot;
  s->nb_queued++;
  if (s->nb_idle_threads > 0) {
    pthread_cond_signal(&s->work_ready);
  }
  pthread_mutex_unlock(&s->lock);
  s->nb_in_flight++;
  tio_update_ref(s);
  return NULL;
}

/*
 * preadNowait(fd, view, offset) -> bytes read, or -errno: one preadv2(RWF_NOWAIT) on this thread.
 * On a buffered file it answers from the page cache and fails with -EAGAIN where it would have to
 * wait for the device (or -EOPNOTSUPP where the file system has no non-blocking reads): the caller
 * then queues the read on the pool. A short count means only part of the range was cached (or the
 * end of file).
 */
static napi_value js_pread_nowait(napi_env env, napi_callback_info info) {
  napi_value argv[3], result;
  int fd;
  uint8_t *data;
  size_t bytes;
  int64_t offset;
  if (!get_args(env, info, 3, argv) || !get_fd(env, argv[0], &fd) || !get_bytes(env, argv[1], "view", &data, &bytes) ||
      !get_safe_uint(env, argv[2], "offset", &offset)) {
    return NULL;
  }
  struct iovec iov = {data, bytes};
  ssize_t n;
  do {
    n = preadv2(fd, &iov, 1, offset, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  NAPI_CALL(env, napi_create_double(env, n < 0 ? -(double)errno : (double)n, &result));
  return result;
}

bool register_thread_io(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"threadIoCreate", NULL, js_thread_io_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"threadIoSubmit", NULL, js_thread_io_submit, NULL, NULL, NULL, napi_enumerable, NULL},
      {"preadNowait", NULL, js_pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return define_functions(env, exports, functions, sizeof functions / sizeof functions[0]);
}
