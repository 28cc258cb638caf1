/*
 * Linux native AIO on the event loop:
 *   aioCreate(capacity, outSlots, outResults, onComplete)   a context with `capacity` request slots
 *   aioSubmit(handle, slot, write, fd, view, offset)         queue one O_DIRECT pread/pwrite on it
 */
#include "qcow2fuse.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/aio_abi.h>
#include <sys/eventfd.h>
#include <time.h>
#include <uv.h>

/*
 * Linux native AIO for O_DIRECT files (QEMU's aio=native): requests are queued by aioSubmit and
 * handed to the kernel in batches — every AIO_SUBMIT_BATCH requests, and the rest by a uv_prepare
 * handle that runs just before the loop blocks — and completions are signalled
 * on an eventfd watched by the loop, reaped with io_getevents and handed to JS in one call per batch.
 * No thread is involved: libuv's threadpool (4 threads by default) caps a queue of O_DIRECT requests
 * at 4 in flight, AIO keeps the whole queue at the device.
 *
 * JS owns the slots: a slot (0 .. capacity-1) names one request from submit to completion and is
 * reused only after its completion was delivered; JS keeps the buffer alive meanwhile. Completions
 * are written into the JS-provided arrays (slot numbers, and results: bytes transferred or -errno)
 * and announced by onComplete(count), which must consume them before returning.
 */
/* Queued requests submitted at once without waiting for the loop's prepare phase. */
#define AIO_SUBMIT_BATCH 16

typedef struct aio_state aio_state_t;
static void aio_on_prepare(uv_prepare_t *handle);

struct aio_state {
  napi_env env;
  aio_context_t kernel_ctx;
  int event_fd;
  uv_poll_t poll;
  uv_prepare_t prepare;
  int nb_open_handles;
  uint32_t capacity;
  struct iocb *iocbs;     /* one per slot */
  struct iocb **pending;  /* queued by JS, not yet accepted by the kernel */
  uint32_t nb_pending;
  int32_t *failed_slots;  /* refused by io_submit, completed at the next prepare */
  int *failed_errnos;
  uint32_t nb_failed;
  uint32_t nb_in_kernel;
  struct io_event *events;
  int32_t *out_slots;
  double *out_results;
  completion_sink_t sink;
  napi_async_cleanup_hook_handle cleanup_hook;
};

/* Keep the event loop alive exactly while requests are queued, refused or in the kernel. */
static void aio_update_ref(aio_state_t *s) {
  if (s->nb_pending + s->nb_in_kernel + s->nb_failed > 0) {
    uv_ref((uv_handle_t *)&s->poll);
  } else {
    uv_unref((uv_handle_t *)&s->poll);
  }
}

/*
 * Hand the queued requests to the kernel. A request it refuses is set aside with its errno, to be
 * completed from the prepare callback (never from inside aioSubmit, where JS is on the stack).
 */
static void aio_submit_pending(aio_state_t *s) {
  uint32_t done = 0;
  while (done < s->nb_pending) {
    long ret = syscall(SYS_io_submit, s->kernel_ctx, (long)(s->nb_pending - done), s->pending + done);
    if (ret > 0) {
      s->nb_in_kernel += (uint32_t)ret;
      done += (uint32_t)ret;
      continue;
    }
    int err = ret == 0 ? EAGAIN : errno;
    if (err == EINTR) {
      continue;
    }
    if (err == EAGAIN && s->nb_in_kernel > 0) {
      break; /* the kernel is full: retry after completions free room */
    }
    struct iocb *refused = s->pending[done++];
    s->failed_slots[s->nb_failed] = (int32_t)refused->aio_data;
    s->failed_errnos[s->nb_failed] = err;
    s->nb_failed++;
  }
  memmove(s->pending, s->pending + done, (s->nb_pending - done) * sizeof *s->pending);
  s->nb_pending -= done;
  if (s->nb_pending > 0 || s->nb_failed > 0) {
    uv_prepare_start(&s->prepare, aio_on_prepare);
  }
  aio_update_ref(s);
}

/* Just before the loop waits: submit what JS queued since, and complete refused requests. */
static void aio_on_prepare(uv_prepare_t *handle) {
  aio_state_t *s = handle->data;
  aio_submit_pending(s);
  uint32_t nb_failed = s->nb_failed;
  for (uint32_t i = 0; i < nb_failed; i++) {
    s->out_slots[i] = s->failed_slots[i];
    s->out_results[i] = -(double)s->failed_errnos[i];
  }
  s->nb_failed = 0;
  if (s->nb_pending == 0) {
    uv_prepare_stop(&s->prepare);
  }
  aio_update_ref(s);
  if (nb_failed > 0) {
    completion_sink_deliver(s->env, &s->sink, nb_failed);
  }
}

static void aio_on_event(uv_poll_t *handle, int status, int events) {
  aio_state_t *s = handle->data;
  uint64_t signalled;
  while (read(s->event_fd, &signalled, sizeof signalled) < 0 && errno == EINTR) {
  }
  for (;;) {
    struct timespec no_wait = {0, 0};
    long n = syscall(SYS_io_getevents, s->kernel_ctx, 0L, (long)s->capacity, s->events, &no_wait);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    for (long i = 0; i < n; i++) {
      s->out_slots[i] = (int32_t)s->events[i].data;
      s->out_results[i] = (double)s->events[i].res;
    }
    s->nb_in_kernel -= (uint32_t)n;
    aio_update_ref(s);
    completion_sink_deliver(s->env, &s->sink, (uint32_t)n);
    if ((uint32_t)n < s->capacity) {
      break;
    }
  }
  if (s->nb_pending > 0) {
    uv_prepare_start(&s->prepare, aio_on_prepare);
  }
  aio_update_ref(s);
}

static void aio_free(aio_state_t *s) {
  if (s->kernel_ctx != 0) {
    syscall(SYS_io_destroy, s->kernel_ctx); /* waits for requests still in the kernel */
  }
  if (s->event_fd >= 0) {
    close(s->event_fd);
  }
  free(s->iocbs);
  free(s->pending);
  free(s->failed_slots);
  free(s->failed_errnos);
  free(s->events);
  free(s);
}

static void aio_handle_closed(uv_handle_t *handle) {
  aio_state_t *s = handle->data;
  if (--s->nb_open_handles > 0) {
    return;
  }
  napi_env env = s->env;
  completion_sink_release(env, &s->sink);
  napi_async_cleanup_hook_handle hook = s->cleanup_hook;
  aio_free(s);
  napi_remove_async_cleanup_hook(hook);
}

/* Environment teardown: close the loop handles, then release the kernel context. */
static void aio_cleanup(napi_async_cleanup_hook_handle hook, void *arg) {
  aio_state_t *s = arg;
  uv_poll_stop(&s->poll);
  uv_prepare_stop(&s->prepare);
  uv_close((uv_handle_t *)&s->poll, aio_handle_closed);
  uv_close((uv_handle_t *)&s->prepare, aio_handle_closed);
}

/*
 * aioCreate(capacity, outSlots: Int32Array, outResults: Float64Array, onComplete(count)) -> handle.
 * Throws the io_setup/eventfd errno error when the kernel has no AIO for us (ENOSYS, EAGAIN when
 * fs.aio-max-nr is exhausted); callers then use the threadpool.
 */
static napi_value js_aio_create(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int capacity;
  void *out_slots, *out_results;
  napi_valuetype callback_type;
  if (!get_args(env, info, 4, argv) || !get_small_int(env, argv[0], "capacity", &capacity)) {
    return NULL;
  }
  if (capacity < 1 || capacity > 4096) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "capacity must be 1..4096");
    return NULL;
  }
  if (!get_typed_array(env, argv[1], napi_int32_array, (size_t)capacity, "outSlots", &out_slots) ||
      !get_typed_array(env, argv[2], napi_float64_array, (size_t)capacity, "outResults", &out_results)) {
    return NULL;
  }
  if (napi_typeof(env, argv[3], &callback_type) != napi_ok || callback_type != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "onComplete must be a function");
    return NULL;
  }
  aio_state_t *s = calloc(1, sizeof *s);
  if (s == NULL) {
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  s->env = env;
  s->event_fd = -1;
  s->capacity = (uint32_t)capacity;
  s->out_slots = out_slots;
  s->out_results = out_results;
  s->iocbs = calloc((size_t)capacity, sizeof *s->iocbs);
  s->pending = calloc((size_t)capacity, sizeof *s->pending);
  s->events = calloc((size_t)capacity, sizeof *s->events);
  s->failed_slots = calloc((size_t)capacity, sizeof *s->failed_slots);
  s->failed_errnos = calloc((size_t)capacity, sizeof *s->failed_errnos);
  if (s->iocbs == NULL || s->pending == NULL || s->events == NULL || s->failed_slots == NULL || s->failed_errnos == NULL) {
    aio_free(s);
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  if (syscall(SYS_io_setup, (unsigned)capacity, &s->kernel_ctx) != 0) {
    int err = errno;
    s->kernel_ctx = 0;
    aio_free(s);
    throw_errno(env, err, "io_setup");
    return NULL;
  }
  s->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (s->event_fd < 0) {
    int err = errno;
    aio_free(s);
    throw_errno(env, err, "eventfd");
    return NULL;
  }
  uv_loop_t *loop;
  napi_value external;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &s->poll, s->event_fd) != 0) {
    aio_free(s);
    throw_napi_failure(env, "cannot watch the AIO eventfd");
    return NULL;
  }
  uv_prepare_init(loop, &s->prepare);
  s->poll.data = s;
  s->prepare.data = s;
  s->nb_open_handles = 2;
  uv_unref((uv_handle_t *)&s->prepare);
  uv_poll_start(&s->poll, UV_READABLE, aio_on_event);
  uv_unref((uv_handle_t *)&s->poll);
  if (!completion_sink_init(env, &s->sink, argv[1], argv[2], argv[3], "qcow2fuse:aio")) {
    throw_napi_failure(env, "cannot hold the completion callback");
    return NULL;
  }
  NAPI_CALL(env, napi_add_async_cleanup_hook(env, aio_cleanup, s, &s->cleanup_hook));
  NAPI_CALL(env, napi_create_external(env, s, NULL, NULL, &external));
  return external;
}

/*
 * aioSubmit(handle, slot, write, fd, view, offset): queue one pread (write false) or pwrite of all of
 * `view` at `offset`; it goes to the kernel before the loop next blocks. The slot must be free.
 */
static napi_value js_aio_submit(napi_env env, napi_callback_info info) {
  io_submit_args_t a;
  if (!get_io_submit_args(env, info, "an AIO", &a)) {
    return NULL;
  }
  aio_state_t *s = a.handle;
  if ((uint32_t)a.slot >= s->capacity || s->nb_pending >= s->capacity) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "slot out of range");
    return NULL;
  }
  struct iocb *cb = &s->iocbs[a.slot];
  memset(cb, 0, sizeof *cb);
  cb->aio_data = (uint64_t)a.slot;
  cb->aio_lio_opcode = a.write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
  cb->aio_fildes = (uint32_t)a.fd;
  cb->aio_buf = (uint64_t)(uintptr_t)a.data;
  cb->aio_nbytes = a.bytes;
  cb->aio_offset = a.offset;
  cb->aio_flags = IOCB_FLAG_RESFD;
  cb->aio_resfd = (uint32_t)s->event_fd;
  s->pending[s->nb_pending++] = cb;
  if (s->nb_pending >= AIO_SUBMIT_BATCH) {
    aio_submit_pending(s); /* keep the device busy while JS goes on queueing */
  } else {
    uv_prepare_start(&s->prepare, aio_on_prepare);
  }
  aio_update_ref(s);
  return NULL;
}

bool register_aio(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"aioCreate", NULL, js_aio_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"aioSubmit", NULL, js_aio_submit, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return define_functions(env, exports, functions, sizeof functions / sizeof functions[0]);
}
