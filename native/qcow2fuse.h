/*
 * qcow2fuse native addon: what every part shares — N-API error helpers, argument parsing, the
 * threadpool job runner, and each part's registration function (addon.c calls them all).
 *
 * Conventions: every 64-bit quantity crosses into JS as a double that must be a safe integer
 * (0 <= v <= 2^53-1); anything else is a RangeError. Syscall failures become an Error whose `code`
 * is the errno name ('EOPNOTSUPP', 'EAGAIN' ...), `errno` the negated errno (as Node's fs does) and
 * `syscall` the call.
 */
#ifndef QCOW2FUSE_NATIVE_H
#define QCOW2FUSE_NATIVE_H

#include <node_api.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_SAFE_INTEGER 9007199254740991.0

#define NAPI_CALL(env, call)                                                  \
  do {                                                                        \
    if ((call) != napi_ok) {                                                  \
      throw_napi_failure((env), #call);                                       \
      return NULL;                                                            \
    }                                                                         \
  } while (0)

/* ---------------------------------------------------------- util.c: errors, arguments */

/* Throw ERR_NATIVE naming `what`, unless an exception is already pending. */
void throw_napi_failure(napi_env env, const char *what);
/* An Error for a failed syscall: {code: errno name, errno: -err, syscall}; NULL on failure. */
napi_value make_errno_error(napi_env env, int err, const char *syscall_name);
void throw_errno(napi_env env, int err, const char *syscall_name);
/* An Error with only a code (no errno), e.g. EBADCOMPRESSED. */
napi_value make_coded_error(napi_env env, const char *code, const char *message);

bool get_args(napi_env env, napi_callback_info info, size_t expected, napi_value *argv);
/* A safe non-negative integer carried as a double (offsets, lengths). */
bool get_safe_uint(napi_env env, napi_value value, const char *name, int64_t *out);
bool get_fd(napi_env env, napi_value value, int *out);
bool get_small_int(napi_env env, napi_value value, const char *name, int *out);
/* Short ASCII string argument (lock type, codec name) into buf. */
bool get_short_string(napi_env env, napi_value value, const char *name, char *buf, size_t size);
/* Memory of a TypedArray/Buffer/DataView argument: pointer and byte length. */
bool get_bytes(napi_env env, napi_value value, const char *name, uint8_t **data, size_t *bytes);
/* A typed array argument of the given type with at least `min_length` elements. */
bool get_typed_array(napi_env env, napi_value value, napi_typedarray_type want, size_t min_length, const char *name,
                     void **data);
bool set_int_property(napi_env env, napi_value object, const char *name, int32_t value);

/* The arguments of an I/O engine's submit call (aioSubmit, threadIoSubmit). */
typedef struct {
  void *handle;
  int slot;
  bool write;
  int fd;
  uint8_t *data;
  size_t bytes;
  int64_t offset;
} io_submit_args_t;
/*
 * Parse (handle, slot, write, fd, view, offset) of a submit call; `handle_kind` names the engine in
 * the TypeError for a wrong handle. false with an exception pending on a bad argument.
 */
bool get_io_submit_args(napi_env env, napi_callback_info info, const char *handle_kind, io_submit_args_t *out);

/*
 * How an I/O engine (aio.c, threadio.c) hands completions to JS: it writes (slot, result) pairs into
 * the JS-provided outSlots/outResults arrays, then completion_sink_deliver(count) calls
 * onComplete(count) in the sink's async context; an exception thrown there is fatal, as from any
 * callback. The sink holds references to the two arrays (their memory stays valid) and the callback.
 */
typedef struct {
  napi_ref out_slots_ref;
  napi_ref out_results_ref;
  napi_ref callback_ref;
  napi_async_context async_ctx;
} completion_sink_t;
/* false with an exception pending on failure. */
bool completion_sink_init(napi_env env, completion_sink_t *sink, napi_value out_slots, napi_value out_results,
                          napi_value callback, const char *name);
void completion_sink_deliver(napi_env env, completion_sink_t *sink, uint32_t count);
void completion_sink_release(napi_env env, completion_sink_t *sink);
/* Define `count` functions on `exports`; false with an exception pending on failure. */
bool define_functions(napi_env env, napi_value exports, const napi_property_descriptor *functions, size_t count);

/* ---------------------------------------------------------- jobs.c: threadpool jobs */

/*
 * One promise-returning job on the libuv threadpool. A part embeds job_t as the FIRST member of its
 * own job struct and supplies: execute (threadpool, no N-API), settle (loop thread: the value to
 * resolve or, with *reject, to reject with; NULL with an exception pending on failure) and release
 * (loop thread: free what the part's struct owns beyond the references; may be NULL).
 */
typedef struct job job_t;
struct job {
  napi_async_work work;
  napi_deferred deferred;
  void (*execute)(job_t *job);
  napi_value (*settle)(napi_env env, job_t *job, bool *reject);
  void (*release)(job_t *job);
  /* JS values (buffers) the job works on, kept alive until it completes; NULL when unused. */
  napi_ref refs[2];
};

/* calloc `bytes` (>= sizeof(job_t)) with the callbacks set; NULL with an exception pending. */
job_t *job_new(napi_env env, size_t bytes, void (*execute)(job_t *), napi_value (*settle)(napi_env, job_t *, bool *),
               void (*release)(job_t *));
/* Keep `value` alive while the job runs (slot 0 or 1); false with an exception pending (job freed). */
bool job_hold(napi_env env, job_t *job, int slot, napi_value value);
/* Queue a prepared job; returns its promise (NULL with an exception pending, job freed). */
napi_value job_queue(napi_env env, job_t *job, const char *resource_name);

/* ------------------------------------ fuse_kernel_worker.c: a FUSE session's kernel-side thread */

#include <uv.h>

typedef struct kernel_worker kernel_worker_t;
/* Called on the loop thread when a write-back job ends (err 0 or an errno). */
typedef void (*kernel_worker_done_fn)(void *ctx, double token, int err);
/* Start the thread for a session: its /dev/fuse fd (dup'ed) and mountpoint. NULL on failure. */
kernel_worker_t *kernel_worker_start(uv_loop_t *loop, int fuse_fd, const char *mountpoint, kernel_worker_done_fn done, void *ctx);
/* Queue FUSE_NOTIFY_INVAL_INODE for [offset, offset + length) of ino (length 0: to the end). */
bool kernel_worker_inval(kernel_worker_t *w, uint64_t ino, int64_t offset, int64_t length);
/* Queue a write-back of the kernel's dirty pages of mountpoint/path from offset on; done(token, err) follows. */
bool kernel_worker_write_back(kernel_worker_t *w, const char *path, int64_t offset, double token);
/* Loop thread: no more jobs nor callbacks; the thread frees everything once its current job ends. */
void kernel_worker_stop(kernel_worker_t *w);

/* ---------------------------------------------------------- parts: registration */

bool register_aligned(napi_env env, napi_value exports);
bool register_codecs(napi_env env, napi_value exports);
bool register_file(napi_env env, napi_value exports);
bool register_aio(napi_env env, napi_value exports);
bool register_thread_io(napi_env env, napi_value exports);
bool register_fuse_session(napi_env env, napi_value exports);

#endif
