/*
 * qcow2fuse native addon (N-API, C).
 *
 * What Node cannot do by itself, each call small and audited:
 *   alignedBuffer(bytes, alignment)            posix_memalign-backed Buffer, freed by a finalizer
 *   bufferAddressAlignment(view)               largest power of two dividing the view's address
 *   fallocate(fd, mode, offset, length)        Promise, libuv threadpool
 *   fadvise(fd, offset, length, advice)        Promise, libuv threadpool
 *   ofdSetLock(fd, type, start, len)           F_OFD_SETLK, non-blocking; throws EAGAIN/EACCES on conflict
 *   ofdGetLock(fd, type, start, len)           F_OFD_GETLK: null or {type, start, len, pid}
 *   dioAlignment(fd)                           statx(STATX_DIOALIGN) or the 4096 fallback
 *   compress(type, src, maxOutBytes)           Promise<Buffer|null>, QEMU qcow2-compatible zlib/zstd
 *   decompress(type, src, dst)                 Promise<void>, fills dst exactly or rejects EBADCOMPRESSED
 *   aioCreate(capacity, outSlots, outResults, onComplete)   Linux native AIO context on the event loop
 *   aioSubmit(handle, slot, write, fd, view, offset)         queue one O_DIRECT pread/pwrite on it
 *
 * Conventions: every 64-bit quantity crosses into JS as a double that must be a safe integer
 * (0 <= v <= 2^53-1); anything else is a RangeError. Syscall failures become an Error whose `code`
 * is the errno name ('EOPNOTSUPP', 'EAGAIN' ...), `errno` the negated errno (as Node's fs does) and
 * `syscall` the call. The codecs replicate QEMU's block/qcow2-threads.c exactly (see each function)
 * and are linked statically with local symbols (binding.gyp), so Node's bundled zlib cannot
 * interpose: a cluster compresses to the same bytes qemu-img writes.
 */
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/aio_abi.h>
#include <sys/eventfd.h>
#include <time.h>
#include <uv.h>

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif

#define MAX_SAFE_INTEGER 9007199254740991.0
/* Fallback O_DIRECT alignment when the kernel cannot tell (statx without STATX_DIOALIGN). */
#define DIO_FALLBACK_ALIGN 4096u
/*
 * Largest zstd window we accept when decoding (2^23 = 8 MiB). QEMU writes single-frame streams of at
 * most one cluster (<= 2 MiB), whose window never exceeds the content size; the cap keeps a hostile
 * frame header from making the decoder allocate zstd's default 128 MiB.
 */
#define ZSTD_WINDOW_LOG_MAX 23

#define NAPI_CALL(env, call)                                                  \
  do {                                                                        \
    if ((call) != napi_ok) {                                                  \
      throw_napi_failure((env), #call);                                       \
      return NULL;                                                            \
    }                                                                         \
  } while (0)

/* ---------------------------------------------------------------- errors */

static void throw_napi_failure(napi_env env, const char *what) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) {
    napi_throw_error(env, "ERR_NATIVE", what);
  }
}

/* Build an Error for a failed syscall: {code: errno name, errno: -err, syscall}. */
static napi_value make_errno_error(napi_env env, int err, const char *syscall_name) {
  const char *name = strerrorname_np(err);
  char code_buf[32];
  if (name == NULL) {
    snprintf(code_buf, sizeof code_buf, "E%d", err);
    name = code_buf;
  }
  char text_buf[64];
  const char *text = strerror_r(err, text_buf, sizeof text_buf);
  char message[256];
  snprintf(message, sizeof message, "%s: %s, %s", name, text, syscall_name);

  napi_value code_v, message_v, error_v, errno_v, syscall_v;
  if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &message_v) != napi_ok ||
      napi_create_error(env, code_v, message_v, &error_v) != napi_ok ||
      napi_create_int32(env, -err, &errno_v) != napi_ok ||
      napi_create_string_utf8(env, syscall_name, NAPI_AUTO_LENGTH, &syscall_v) != napi_ok ||
      napi_set_named_property(env, error_v, "errno", errno_v) != napi_ok ||
      napi_set_named_property(env, error_v, "syscall", syscall_v) != napi_ok) {
    return NULL;
  }
  return error_v;
}

static void throw_errno(napi_env env, int err, const char *syscall_name) {
  napi_value error_v = make_errno_error(env, err, syscall_name);
  if (error_v == NULL) {
    throw_napi_failure(env, "cannot create error object");
    return;
  }
  napi_throw(env, error_v);
}

/* An Error with only a code (no errno), e.g. EBADCOMPRESSED. */
static napi_value make_coded_error(napi_env env, const char *code, const char *message) {
  napi_value code_v, message_v, error_v;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &message_v) != napi_ok ||
      napi_create_error(env, code_v, message_v, &error_v) != napi_ok) {
    return NULL;
  }
  return error_v;
}

/* ------------------------------------------------------ argument parsing */

static bool get_args(napi_env env, napi_callback_info info, size_t expected, napi_value *argv) {
  size_t argc = expected;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_napi_failure(env, "napi_get_cb_info");
    return false;
  }
  if (argc < expected) {
    char message[64];
    snprintf(message, sizeof message, "expected %zu arguments, got %zu", expected, argc);
    napi_throw_type_error(env, "ERR_MISSING_ARGS", message);
    return false;
  }
  return true;
}

/* A safe non-negative integer carried as a double (offsets, lengths). */
static bool get_safe_uint(napi_env env, napi_value value, const char *name, int64_t *out) {
  double d;
  if (napi_get_value_double(env, value, &d) != napi_ok) {
    char message[96];
    snprintf(message, sizeof message, "%s must be a number", name);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
    return false;
  }
  if (!isfinite(d) || d < 0 || d > MAX_SAFE_INTEGER || trunc(d) != d) {
    char message[128];
    snprintf(message, sizeof message, "%s must be a safe non-negative integer, got %g", name, d);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", message);
    return false;
  }
  *out = (int64_t)d;
  return true;
}

static bool get_fd(napi_env env, napi_value value, int *out) {
  int64_t fd;
  if (!get_safe_uint(env, value, "fd", &fd)) {
    return false;
  }
  if (fd > INT_MAX) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "fd out of range");
    return false;
  }
  *out = (int)fd;
  return true;
}

static bool get_small_int(napi_env env, napi_value value, const char *name, int *out) {
  int64_t v;
  if (!get_safe_uint(env, value, name, &v)) {
    return false;
  }
  if (v > INT_MAX) {
    char message[96];
    snprintf(message, sizeof message, "%s out of range", name);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", message);
    return false;
  }
  *out = (int)v;
  return true;
}

/* Short ASCII string argument (lock type, codec name) into buf. */
static bool get_short_string(napi_env env, napi_value value, const char *name, char *buf, size_t size) {
  size_t copied;
  if (napi_get_value_string_utf8(env, value, buf, size, &copied) != napi_ok) {
    char message[96];
    snprintf(message, sizeof message, "%s must be a string", name);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
    return false;
  }
  return true;
}

static size_t typedarray_element_bytes(napi_typedarray_type type) {
  switch (type) {
    case napi_int8_array:
    case napi_uint8_array:
    case napi_uint8_clamped_array:
      return 1;
    case napi_int16_array:
    case napi_uint16_array:
      return 2;
    case napi_int32_array:
    case napi_uint32_array:
    case napi_float32_array:
      return 4;
    default:
      return 8;
  }
}

/* Memory of a TypedArray/Buffer/DataView argument: pointer and byte length. */
static bool get_bytes(napi_env env, napi_value value, const char *name, uint8_t **data, size_t *bytes) {
  bool is_typedarray = false, is_dataview = false;
  napi_is_typedarray(env, value, &is_typedarray);
  if (is_typedarray) {
    napi_typedarray_type type;
    size_t length;
    void *ptr;
    if (napi_get_typedarray_info(env, value, &type, &length, &ptr, NULL, NULL) != napi_ok) {
      throw_napi_failure(env, "napi_get_typedarray_info");
      return false;
    }
    *data = ptr;
    *bytes = length * typedarray_element_bytes(type);
    return true;
  }
  napi_is_dataview(env, value, &is_dataview);
  if (is_dataview) {
    size_t length;
    void *ptr;
    if (napi_get_dataview_info(env, value, &length, &ptr, NULL, NULL) != napi_ok) {
      throw_napi_failure(env, "napi_get_dataview_info");
      return false;
    }
    *data = ptr;
    *bytes = length;
    return true;
  }
  char message[96];
  snprintf(message, sizeof message, "%s must be a Buffer, TypedArray or DataView", name);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  return false;
}

/* ---------------------------------------------------------- aligned memory */

static void free_aligned(napi_env env, void *data, void *hint) {
  int64_t adjusted;
  free(data);
  napi_adjust_external_memory(env, -(int64_t)(uintptr_t)hint, &adjusted);
}

/* alignedBuffer(bytes, alignment): zero-filled Buffer whose memory starts at a multiple of alignment. */
static napi_value aligned_buffer(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t bytes, alignment;
  if (!get_args(env, info, 2, argv) || !get_safe_uint(env, argv[0], "bytes", &bytes) ||
      !get_safe_uint(env, argv[1], "alignment", &alignment)) {
    return NULL;
  }
  if (alignment < (int64_t)sizeof(void *) || alignment > (1 << 24) || (alignment & (alignment - 1)) != 0) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "alignment must be a power of two between 8 and 16 MiB");
    return NULL;
  }
  if ((uint64_t)bytes > (uint64_t)SIZE_MAX / 2) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "bytes too large");
    return NULL;
  }
  void *memory = NULL;
  /* posix_memalign(0) may return NULL; always allocate at least one byte. */
  size_t alloc_bytes = bytes > 0 ? (size_t)bytes : 1;
  int err = posix_memalign(&memory, (size_t)alignment, alloc_bytes);
  if (err != 0) {
    throw_errno(env, err, "posix_memalign");
    return NULL;
  }
  memset(memory, 0, alloc_bytes);
  napi_value result;
  if (napi_create_external_buffer(env, (size_t)bytes, memory, free_aligned, (void *)(uintptr_t)alloc_bytes,
                                  &result) != napi_ok) {
    free(memory);
    throw_napi_failure(env, "napi_create_external_buffer");
    return NULL;
  }
  int64_t adjusted;
  napi_adjust_external_memory(env, (int64_t)alloc_bytes, &adjusted);
  return result;
}

/* bufferAddressAlignment(view): largest power of two (capped at 2^30) dividing the data address. */
static napi_value buffer_address_alignment(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  uint8_t *data;
  size_t bytes;
  if (!get_args(env, info, 1, argv) || !get_bytes(env, argv[0], "buffer", &data, &bytes)) {
    return NULL;
  }
  const uintptr_t cap = (uintptr_t)1 << 30;
  uintptr_t address = (uintptr_t)data;
  uintptr_t alignment = address == 0 ? cap : (address & (~address + 1));
  if (alignment > cap) {
    alignment = cap;
  }
  napi_value result;
  NAPI_CALL(env, napi_create_double(env, (double)alignment, &result));
  return result;
}

/* --------------------------------------------------------------- codecs */

enum codec { CODEC_ZLIB, CODEC_ZSTD };
enum codec_status { CODEC_OK, CODEC_NO_FIT, CODEC_BAD_DATA, CODEC_NO_MEMORY };

/*
 * Per-thread codec contexts, reused across jobs on the same libuv threadpool thread (reset before
 * each use; reset contexts produce the same output as fresh ones). Never freed: pool threads live
 * as long as the process.
 */
static __thread z_stream *tls_deflate;
static __thread z_stream *tls_inflate;
static __thread ZSTD_CCtx *tls_zstd_cctx;
static __thread ZSTD_DCtx *tls_zstd_dctx;

/*
 * QEMU qcow2_zlib_compress: raw deflate (window bits -12), memLevel 9, Z_DEFAULT_COMPRESSION,
 * one deflate(Z_FINISH) call. Z_STREAM_END = fits; Z_OK (out of output space) = does not fit.
 */
static enum codec_status zlib_compress(const uint8_t *src, size_t src_bytes, uint8_t *dst, size_t dst_bytes,
                                       size_t *out_bytes) {
  if (tls_deflate == NULL) {
    z_stream *strm = calloc(1, sizeof *strm);
    if (strm == NULL) {
      return CODEC_NO_MEMORY;
    }
    if (deflateInit2(strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
      free(strm);
      return CODEC_NO_MEMORY;
    }
    tls_deflate = strm;
  } else if (deflateReset(tls_deflate) != Z_OK) {
    return CODEC_NO_MEMORY;
  }
  z_stream *strm = tls_deflate;
  strm->next_in = (Bytef *)src;
  strm->avail_in = (uInt)src_bytes;
  strm->next_out = dst;
  strm->avail_out = (uInt)dst_bytes;
  int ret = deflate(strm, Z_FINISH);
  if (ret == Z_STREAM_END) {
    *out_bytes = dst_bytes - strm->avail_out;
    return CODEC_OK;
  }
  return (ret == Z_OK || ret == Z_BUF_ERROR) ? CODEC_NO_FIT : CODEC_NO_MEMORY;
}

/*
 * QEMU qcow2_zlib_decompress: inflateInit2(-12), one inflate(Z_FINISH). Success when dst is full and
 * the result is Z_STREAM_END or Z_BUF_ERROR (the compressed length is only known to the sector, so
 * trailing input is normal).
 */
static enum codec_status zlib_decompress(const uint8_t *src, size_t src_bytes, uint8_t *dst, size_t dst_bytes) {
  if (tls_inflate == NULL) {
    z_stream *strm = calloc(1, sizeof *strm);
    if (strm == NULL) {
      return CODEC_NO_MEMORY;
    }
    if (inflateInit2(strm, -12) != Z_OK) {
      free(strm);
      return CODEC_NO_MEMORY;
    }
    tls_inflate = strm;
  } else if (inflateReset(tls_inflate) != Z_OK) {
    return CODEC_NO_MEMORY;
  }
  z_stream *strm = tls_inflate;
  strm->next_in = (Bytef *)src;
  strm->avail_in = (uInt)src_bytes;
  strm->next_out = dst;
  strm->avail_out = (uInt)dst_bytes;
  int ret = inflate(strm, Z_FINISH);
  if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && strm->avail_out == 0) {
    return CODEC_OK;
  }
  return ret == Z_MEM_ERROR ? CODEC_NO_MEMORY : CODEC_BAD_DATA;
}

/*
 * QEMU qcow2_zstd_compress: ZSTD_compressStream2(ZSTD_e_end) with default parameters, looping until
 * all input is consumed and each frame flushed; a flush remainder larger than the space left means
 * the result does not fit.
 */
static enum codec_status zstd_compress(const uint8_t *src, size_t src_bytes, uint8_t *dst, size_t dst_bytes,
                                       size_t *out_bytes) {
  if (tls_zstd_cctx == NULL) {
    tls_zstd_cctx = ZSTD_createCCtx();
    if (tls_zstd_cctx == NULL) {
      return CODEC_NO_MEMORY;
    }
  } else {
    ZSTD_CCtx_reset(tls_zstd_cctx, ZSTD_reset_session_only);
  }
  ZSTD_outBuffer output = {dst, dst_bytes, 0};
  ZSTD_inBuffer input = {src, src_bytes, 0};
  while (input.pos < input.size) {
    size_t remaining;
    do {
      remaining = ZSTD_compressStream2(tls_zstd_cctx, &output, &input, ZSTD_e_end);
      if (ZSTD_isError(remaining)) {
        return ZSTD_getErrorCode(remaining) == ZSTD_error_dstSize_tooSmall ? CODEC_NO_FIT : CODEC_NO_MEMORY;
      }
      if (remaining > output.size - output.pos) {
        return CODEC_NO_FIT;
      }
    } while (remaining != 0);
  }
  *out_bytes = output.pos;
  return CODEC_OK;
}

/*
 * QEMU qcow2_zstd_decompress: ZSTD_decompressStream until dst is full (several frames allowed), each
 * step must make progress, and the last call must report its frame complete (0). Bytes after the
 * frame that fills dst are ignored.
 */
static enum codec_status zstd_decompress(const uint8_t *src, size_t src_bytes, uint8_t *dst, size_t dst_bytes) {
  if (tls_zstd_dctx == NULL) {
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    if (dctx == NULL) {
      return CODEC_NO_MEMORY;
    }
    if (ZSTD_isError(ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, ZSTD_WINDOW_LOG_MAX))) {
      ZSTD_freeDCtx(dctx);
      return CODEC_NO_MEMORY;
    }
    tls_zstd_dctx = dctx;
  } else {
    ZSTD_DCtx_reset(tls_zstd_dctx, ZSTD_reset_session_only);
  }
  ZSTD_outBuffer output = {dst, dst_bytes, 0};
  ZSTD_inBuffer input = {src, src_bytes, 0};
  size_t ret = 0;
  while (output.pos < output.size) {
    size_t last_in_pos = input.pos;
    size_t last_out_pos = output.pos;
    ret = ZSTD_decompressStream(tls_zstd_dctx, &output, &input);
    if (ZSTD_isError(ret)) {
      return ZSTD_getErrorCode(ret) == ZSTD_error_memory_allocation ? CODEC_NO_MEMORY : CODEC_BAD_DATA;
    }
    if (last_in_pos >= input.pos && last_out_pos >= output.pos) {
      return CODEC_BAD_DATA;
    }
  }
  return ret == 0 ? CODEC_OK : CODEC_BAD_DATA;
}

static bool parse_codec(napi_env env, napi_value value, enum codec *out) {
  char name[8];
  if (!get_short_string(env, value, "type", name, sizeof name)) {
    return false;
  }
  if (strcmp(name, "zlib") == 0) {
    *out = CODEC_ZLIB;
  } else if (strcmp(name, "zstd") == 0) {
    *out = CODEC_ZSTD;
  } else {
    napi_throw_range_error(env, "ERR_INVALID_ARG_VALUE", "compression type must be 'zlib' or 'zstd'");
    return false;
  }
  return true;
}

/* ----------------------------------------------------------- async jobs */

enum job_kind { JOB_FALLOCATE, JOB_FADVISE, JOB_COMPRESS, JOB_DECOMPRESS };

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  enum job_kind kind;
  /* fallocate / fadvise */
  int fd;
  int mode; /* fallocate mode or fadvise advice */
  int64_t offset;
  int64_t length;
  int err; /* errno of the failed syscall, 0 on success */
  /* codecs: src/dst point into JS buffers kept alive by the references */
  enum codec codec;
  napi_ref src_ref;
  napi_ref dst_ref;
  const uint8_t *src;
  size_t src_bytes;
  uint8_t *dst;       /* decompress: the caller's buffer; compress: malloc'd scratch */
  size_t dst_bytes;
  size_t out_bytes;
  enum codec_status status;
} job_t;

static void job_execute(napi_env env, void *data) {
  job_t *job = data;
  switch (job->kind) {
    case JOB_FALLOCATE: {
      int ret;
      do {
        ret = fallocate(job->fd, job->mode, (off_t)job->offset, (off_t)job->length);
      } while (ret != 0 && errno == EINTR);
      job->err = ret == 0 ? 0 : errno;
      break;
    }
    case JOB_FADVISE:
      job->err = posix_fadvise(job->fd, (off_t)job->offset, (off_t)job->length, job->mode);
      break;
    case JOB_COMPRESS:
      job->dst = malloc(job->dst_bytes > 0 ? job->dst_bytes : 1);
      if (job->dst == NULL) {
        job->status = CODEC_NO_MEMORY;
      } else if (job->codec == CODEC_ZLIB) {
        job->status = zlib_compress(job->src, job->src_bytes, job->dst, job->dst_bytes, &job->out_bytes);
      } else {
        job->status = zstd_compress(job->src, job->src_bytes, job->dst, job->dst_bytes, &job->out_bytes);
      }
      break;
    case JOB_DECOMPRESS:
      job->status = job->codec == CODEC_ZLIB ? zlib_decompress(job->src, job->src_bytes, job->dst, job->dst_bytes)
                                             : zstd_decompress(job->src, job->src_bytes, job->dst, job->dst_bytes);
      break;
  }
}

static napi_value job_codec_result(napi_env env, job_t *job, bool *reject) {
  napi_value value = NULL;
  const char *codec_name = job->codec == CODEC_ZLIB ? "zlib" : "zstd";
  char message[128];
  switch (job->status) {
    case CODEC_OK:
      *reject = false;
      if (job->kind == JOB_COMPRESS) {
        void *copy;
        if (napi_create_buffer_copy(env, job->out_bytes, job->dst, &copy, &value) != napi_ok) {
          value = NULL;
        }
      } else if (napi_get_undefined(env, &value) != napi_ok) {
        value = NULL;
      }
      return value;
    case CODEC_NO_FIT:
      *reject = false;
      return napi_get_null(env, &value) == napi_ok ? value : NULL;
    case CODEC_BAD_DATA:
      *reject = true;
      snprintf(message, sizeof message, "%s: invalid compressed data (cannot produce %zu bytes)", codec_name,
               job->dst_bytes);
      return make_coded_error(env, "EBADCOMPRESSED", message);
    case CODEC_NO_MEMORY:
    default:
      *reject = true;
      return make_errno_error(env, ENOMEM, job->kind == JOB_COMPRESS ? "compress" : "decompress");
  }
}

static void job_complete(napi_env env, napi_status status, void *data) {
  job_t *job = data;
  napi_value value = NULL;
  bool reject = true;
  if (status != napi_ok) {
    value = make_coded_error(env, "ECANCELED", "native job cancelled");
  } else if (job->kind == JOB_FALLOCATE || job->kind == JOB_FADVISE) {
    if (job->err != 0) {
      value = make_errno_error(env, job->err, job->kind == JOB_FALLOCATE ? "fallocate" : "posix_fadvise");
    } else {
      reject = false;
      napi_get_undefined(env, &value);
    }
  } else {
    value = job_codec_result(env, job, &reject);
  }
  if (value == NULL) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_get_and_clear_last_exception(env, &value);
    } else {
      value = make_coded_error(env, "ERR_NATIVE", "cannot build the result of a native job");
    }
    reject = true;
  }
  if (reject) {
    napi_reject_deferred(env, job->deferred, value);
  } else {
    napi_resolve_deferred(env, job->deferred, value);
  }
  if (job->src_ref != NULL) {
    napi_delete_reference(env, job->src_ref);
  }
  if (job->dst_ref != NULL) {
    napi_delete_reference(env, job->dst_ref);
  }
  if (job->kind == JOB_COMPRESS) {
    free(job->dst);
  }
  napi_delete_async_work(env, job->work);
  free(job);
}

/* Queue a prepared job on the threadpool; returns its promise (NULL with an exception pending). */
static napi_value job_queue(napi_env env, job_t *job, const char *resource_name) {
  napi_value promise, name;
  if (napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, resource_name, NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, job_execute, job_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    /* A created deferred cannot be dropped cleanly; reject it so the promise settles. */
    if (job->deferred != NULL) {
      napi_value error = make_coded_error(env, "ERR_NATIVE", "cannot queue native job");
      napi_reject_deferred(env, job->deferred, error);
    }
    if (job->work != NULL) {
      napi_delete_async_work(env, job->work);
    }
    if (job->src_ref != NULL) {
      napi_delete_reference(env, job->src_ref);
    }
    if (job->dst_ref != NULL) {
      napi_delete_reference(env, job->dst_ref);
    }
    free(job);
    throw_napi_failure(env, "cannot queue native job");
    return NULL;
  }
  return promise;
}

static job_t *job_new(napi_env env, enum job_kind kind) {
  job_t *job = calloc(1, sizeof *job);
  if (job == NULL) {
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  job->kind = kind;
  return job;
}

/* fallocate(fd, mode, offset, length) -> Promise<void> */
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd, mode;
  int64_t offset, length;
  if (!get_args(env, info, 4, argv) || !get_fd(env, argv[0], &fd) || !get_small_int(env, argv[1], "mode", &mode) ||
      !get_safe_uint(env, argv[2], "offset", &offset) || !get_safe_uint(env, argv[3], "length", &length)) {
    return NULL;
  }
  job_t *job = job_new(env, JOB_FALLOCATE);
  if (job == NULL) {
    return NULL;
  }
  job->fd = fd;
  job->mode = mode;
  job->offset = offset;
  job->length = length;
  return job_queue(env, job, "qcow2fuse.fallocate");
}

/* fadvise(fd, offset, length, advice) -> Promise<void> */
static napi_value js_fadvise(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd, advice;
  int64_t offset, length;
  if (!get_args(env, info, 4, argv) || !get_fd(env, argv[0], &fd) || !get_safe_uint(env, argv[1], "offset", &offset) ||
      !get_safe_uint(env, argv[2], "length", &length) || !get_small_int(env, argv[3], "advice", &advice)) {
    return NULL;
  }
  job_t *job = job_new(env, JOB_FADVISE);
  if (job == NULL) {
    return NULL;
  }
  job->fd = fd;
  job->mode = advice;
  job->offset = offset;
  job->length = length;
  return job_queue(env, job, "qcow2fuse.fadvise");
}

/* compress(type, src, maxOutBytes) -> Promise<Buffer | null> */
static napi_value js_compress(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  enum codec codec;
  uint8_t *src;
  size_t src_bytes;
  int64_t max_out_bytes;
  if (!get_args(env, info, 3, argv) || !parse_codec(env, argv[0], &codec) ||
      !get_bytes(env, argv[1], "src", &src, &src_bytes) ||
      !get_safe_uint(env, argv[2], "maxOutBytes", &max_out_bytes)) {
    return NULL;
  }
  if (src_bytes > UINT_MAX || (uint64_t)max_out_bytes > UINT_MAX) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "compress: buffers are limited to 4 GiB - 1");
    return NULL;
  }
  job_t *job = job_new(env, JOB_COMPRESS);
  if (job == NULL) {
    return NULL;
  }
  job->codec = codec;
  job->src = src;
  job->src_bytes = src_bytes;
  job->dst_bytes = (size_t)max_out_bytes;
  if (napi_create_reference(env, argv[1], 1, &job->src_ref) != napi_ok) {
    free(job);
    throw_napi_failure(env, "napi_create_reference");
    return NULL;
  }
  return job_queue(env, job, "qcow2fuse.compress");
}

/* decompress(type, src, dst) -> Promise<void>; dst is filled completely or the promise rejects. */
static napi_value js_decompress(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  enum codec codec;
  uint8_t *src, *dst;
  size_t src_bytes, dst_bytes;
  if (!get_args(env, info, 3, argv) || !parse_codec(env, argv[0], &codec) ||
      !get_bytes(env, argv[1], "src", &src, &src_bytes) || !get_bytes(env, argv[2], "dst", &dst, &dst_bytes)) {
    return NULL;
  }
  if (src_bytes > UINT_MAX || dst_bytes > UINT_MAX) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "decompress: buffers are limited to 4 GiB - 1");
    return NULL;
  }
  job_t *job = job_new(env, JOB_DECOMPRESS);
  if (job == NULL) {
    return NULL;
  }
  job->codec = codec;
  job->src = src;
  job->src_bytes = src_bytes;
  job->dst = dst;
  job->dst_bytes = dst_bytes;
  if (napi_create_reference(env, argv[1], 1, &job->src_ref) != napi_ok ||
      napi_create_reference(env, argv[2], 1, &job->dst_ref) != napi_ok) {
    if (job->src_ref != NULL) {
      napi_delete_reference(env, job->src_ref);
    }
    free(job);
    throw_napi_failure(env, "napi_create_reference");
    return NULL;
  }
  return job_queue(env, job, "qcow2fuse.decompress");
}

/* ---------------------------------------------------------------- locks */

static bool parse_lock_type(napi_env env, napi_value value, bool allow_unlock, short *out) {
  char name[8];
  if (!get_short_string(env, value, "type", name, sizeof name)) {
    return false;
  }
  if (strcmp(name, "read") == 0) {
    *out = F_RDLCK;
  } else if (strcmp(name, "write") == 0) {
    *out = F_WRLCK;
  } else if (allow_unlock && strcmp(name, "unlock") == 0) {
    *out = F_UNLCK;
  } else {
    napi_throw_range_error(env, "ERR_INVALID_ARG_VALUE",
                           allow_unlock ? "lock type must be 'read', 'write' or 'unlock'"
                                        : "lock type must be 'read' or 'write'");
    return false;
  }
  return true;
}

/* ofdSetLock(fd, type, start, len): F_OFD_SETLK, never waits; len 0 means "to the end of file". */
static napi_value js_ofd_set_lock(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  short type;
  int64_t start, length;
  if (!get_args(env, info, 4, argv) || !get_fd(env, argv[0], &fd) || !parse_lock_type(env, argv[1], true, &type) ||
      !get_safe_uint(env, argv[2], "start", &start) || !get_safe_uint(env, argv[3], "length", &length)) {
    return NULL;
  }
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)start;
  fl.l_len = (off_t)length;
  int ret;
  do {
    ret = fcntl(fd, F_OFD_SETLK, &fl);
  } while (ret == -1 && errno == EINTR);
  if (ret == -1) {
    throw_errno(env, errno, "fcntl(F_OFD_SETLK)");
    return NULL;
  }
  napi_value undefined;
  NAPI_CALL(env, napi_get_undefined(env, &undefined));
  return undefined;
}

/* ofdGetLock(fd, type, start, len): the first conflicting lock held through another open file
 * description, as null or {type, start, len, pid} (pid is -1 for OFD locks). */
static napi_value js_ofd_get_lock(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  short type;
  int64_t start, length;
  if (!get_args(env, info, 4, argv) || !get_fd(env, argv[0], &fd) || !parse_lock_type(env, argv[1], false, &type) ||
      !get_safe_uint(env, argv[2], "start", &start) || !get_safe_uint(env, argv[3], "length", &length)) {
    return NULL;
  }
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)start;
  fl.l_len = (off_t)length;
  int ret;
  do {
    ret = fcntl(fd, F_OFD_GETLK, &fl);
  } while (ret == -1 && errno == EINTR);
  if (ret == -1) {
    throw_errno(env, errno, "fcntl(F_OFD_GETLK)");
    return NULL;
  }
  napi_value result;
  if (fl.l_type == F_UNLCK) {
    NAPI_CALL(env, napi_get_null(env, &result));
    return result;
  }
  napi_value type_v, start_v, length_v, pid_v;
  NAPI_CALL(env, napi_create_object(env, &result));
  NAPI_CALL(env, napi_create_string_utf8(env, fl.l_type == F_RDLCK ? "read" : "write", NAPI_AUTO_LENGTH, &type_v));
  NAPI_CALL(env, napi_create_double(env, (double)fl.l_start, &start_v));
  NAPI_CALL(env, napi_create_double(env, (double)fl.l_len, &length_v));
  NAPI_CALL(env, napi_create_int32(env, fl.l_pid, &pid_v));
  NAPI_CALL(env, napi_set_named_property(env, result, "type", type_v));
  NAPI_CALL(env, napi_set_named_property(env, result, "start", start_v));
  NAPI_CALL(env, napi_set_named_property(env, result, "len", length_v));
  NAPI_CALL(env, napi_set_named_property(env, result, "pid", pid_v));
  return result;
}

/* ---------------------------------------------------------- DIO alignment */

/* struct statx as the kernel ABI defines it (256 bytes); declared here so old libc headers suffice. */
struct kernel_statx_timestamp {
  int64_t tv_sec;
  uint32_t tv_nsec;
  int32_t reserved;
};
struct kernel_statx {
  uint32_t stx_mask;
  uint32_t stx_blksize;
  uint64_t stx_attributes;
  uint32_t stx_nlink;
  uint32_t stx_uid;
  uint32_t stx_gid;
  uint16_t stx_mode;
  uint16_t spare0;
  uint64_t stx_ino;
  uint64_t stx_size;
  uint64_t stx_blocks;
  uint64_t stx_attributes_mask;
  struct kernel_statx_timestamp stx_atime, stx_btime, stx_ctime, stx_mtime;
  uint32_t stx_rdev_major;
  uint32_t stx_rdev_minor;
  uint32_t stx_dev_major;
  uint32_t stx_dev_minor;
  uint64_t stx_mnt_id;
  uint32_t stx_dio_mem_align;
  uint32_t stx_dio_offset_align;
  uint64_t spare3[12];
};
_Static_assert(sizeof(struct kernel_statx) == 256, "statx ABI size");

#define KERNEL_STATX_DIOALIGN 0x00002000u
#ifndef AT_EMPTY_PATH
#define AT_EMPTY_PATH 0x1000
#endif

/*
 * dioAlignment(fd) -> {memAlign, offsetAlign, source}. source 'statx' when the kernel reported the
 * file's O_DIRECT constraints, 'fallback' (4096/4096) when it could not (old kernel, filesystem
 * without the information, or a file that does not support O_DIRECT at all).
 */
static napi_value js_dio_alignment(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], &fd)) {
    return NULL;
  }
  struct kernel_statx stx;
  memset(&stx, 0, sizeof stx);
  uint32_t mem_align = DIO_FALLBACK_ALIGN, offset_align = DIO_FALLBACK_ALIGN;
  const char *source = "fallback";
#ifdef SYS_statx
  long ret = syscall(SYS_statx, fd, "", AT_EMPTY_PATH, KERNEL_STATX_DIOALIGN, &stx);
  if (ret == -1 && errno == EBADF) {
    throw_errno(env, errno, "statx");
    return NULL;
  }
  if (ret == 0 && (stx.stx_mask & KERNEL_STATX_DIOALIGN) != 0 && stx.stx_dio_mem_align != 0 &&
      stx.stx_dio_offset_align != 0) {
    mem_align = stx.stx_dio_mem_align;
    offset_align = stx.stx_dio_offset_align;
    source = "statx";
  }
#endif
  napi_value result, mem_v, offset_v, source_v;
  NAPI_CALL(env, napi_create_object(env, &result));
  NAPI_CALL(env, napi_create_uint32(env, mem_align, &mem_v));
  NAPI_CALL(env, napi_create_uint32(env, offset_align, &offset_v));
  NAPI_CALL(env, napi_create_string_utf8(env, source, NAPI_AUTO_LENGTH, &source_v));
  NAPI_CALL(env, napi_set_named_property(env, result, "memAlign", mem_v));
  NAPI_CALL(env, napi_set_named_property(env, result, "offsetAlign", offset_v));
  NAPI_CALL(env, napi_set_named_property(env, result, "source", source_v));
  return result;
}

/* ------------------------------------------------------------ Linux AIO */

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
  napi_ref out_slots_ref;
  napi_ref out_results_ref;
  napi_ref callback_ref;
  napi_async_context async_ctx;
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

/* Announce `count` completions (already in out_slots/out_results) to JS. */
static void aio_deliver(aio_state_t *s, uint32_t count) {
  napi_env env = s->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) {
    return;
  }
  napi_value callback, recv, argv[1], result;
  if (napi_get_reference_value(env, s->callback_ref, &callback) == napi_ok && callback != NULL &&
      napi_get_global(env, &recv) == napi_ok && napi_create_uint32(env, count, &argv[0]) == napi_ok) {
    napi_status status = napi_make_callback(env, s->async_ctx, recv, callback, 1, argv, &result);
    if (status == napi_pending_exception) {
      napi_value error;
      if (napi_get_and_clear_last_exception(env, &error) == napi_ok) {
        napi_fatal_exception(env, error);
      }
    }
  }
  napi_close_handle_scope(env, scope);
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
    aio_deliver(s, nb_failed);
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
    aio_deliver(s, (uint32_t)n);
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
  napi_delete_reference(env, s->callback_ref);
  napi_delete_reference(env, s->out_slots_ref);
  napi_delete_reference(env, s->out_results_ref);
  napi_async_destroy(env, s->async_ctx);
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

/* A typed array argument of the given type with at least `min_length` elements. */
static bool get_typed_array(napi_env env, napi_value value, napi_typedarray_type want, size_t min_length,
                            const char *name, void **data) {
  bool is_typedarray = false;
  napi_typedarray_type type;
  size_t length;
  char message[96];
  if (napi_is_typedarray(env, value, &is_typedarray) != napi_ok || !is_typedarray ||
      napi_get_typedarray_info(env, value, &type, &length, data, NULL, NULL) != napi_ok || type != want ||
      length < min_length) {
    snprintf(message, sizeof message, "%s must be a typed array of the right type with %zu elements", name, min_length);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
    return false;
  }
  return true;
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
  napi_value name, external;
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
  NAPI_CALL(env, napi_create_reference(env, argv[1], 1, &s->out_slots_ref));
  NAPI_CALL(env, napi_create_reference(env, argv[2], 1, &s->out_results_ref));
  NAPI_CALL(env, napi_create_reference(env, argv[3], 1, &s->callback_ref));
  NAPI_CALL(env, napi_create_string_utf8(env, "qcow2fuse:aio", NAPI_AUTO_LENGTH, &name));
  NAPI_CALL(env, napi_async_init(env, NULL, name, &s->async_ctx));
  NAPI_CALL(env, napi_add_async_cleanup_hook(env, aio_cleanup, s, &s->cleanup_hook));
  NAPI_CALL(env, napi_create_external(env, s, NULL, NULL, &external));
  return external;
}

/*
 * aioSubmit(handle, slot, write, fd, view, offset): queue one pread (write false) or pwrite of all of
 * `view` at `offset`; it goes to the kernel before the loop next blocks. The slot must be free.
 */
static napi_value js_aio_submit(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  aio_state_t *s;
  int slot, fd;
  bool write;
  uint8_t *data;
  size_t bytes;
  int64_t offset;
  if (!get_args(env, info, 6, argv)) {
    return NULL;
  }
  if (napi_get_value_external(env, argv[0], (void **)&s) != napi_ok || s == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "not an AIO handle");
    return NULL;
  }
  if (!get_small_int(env, argv[1], "slot", &slot)) {
    return NULL;
  }
  if (napi_get_value_bool(env, argv[2], &write) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "write must be a boolean");
    return NULL;
  }
  if (!get_fd(env, argv[3], &fd) || !get_bytes(env, argv[4], "view", &data, &bytes) ||
      !get_safe_uint(env, argv[5], "offset", &offset)) {
    return NULL;
  }
  if ((uint32_t)slot >= s->capacity || s->nb_pending >= s->capacity) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "slot out of range");
    return NULL;
  }
  struct iocb *cb = &s->iocbs[slot];
  memset(cb, 0, sizeof *cb);
  cb->aio_data = (uint64_t)slot;
  cb->aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
  cb->aio_fildes = (uint32_t)fd;
  cb->aio_buf = (uint64_t)(uintptr_t)data;
  cb->aio_nbytes = bytes;
  cb->aio_offset = offset;
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

/* ---------------------------------------------------------------- module */

static bool set_int_property(napi_env env, napi_value object, const char *name, int32_t value) {
  napi_value v;
  return napi_create_int32(env, value, &v) == napi_ok && napi_set_named_property(env, object, name, v) == napi_ok;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"alignedBuffer", NULL, aligned_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
      {"bufferAddressAlignment", NULL, buffer_address_alignment, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fadvise", NULL, js_fadvise, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdSetLock", NULL, js_ofd_set_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdGetLock", NULL, js_ofd_get_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dioAlignment", NULL, js_dio_alignment, NULL, NULL, NULL, napi_enumerable, NULL},
      {"compress", NULL, js_compress, NULL, NULL, NULL, napi_enumerable, NULL},
      {"decompress", NULL, js_decompress, NULL, NULL, NULL, napi_enumerable, NULL},
      {"aioCreate", NULL, js_aio_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"aioSubmit", NULL, js_aio_submit, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  NAPI_CALL(env, napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions));

  napi_value falloc, fadv;
  NAPI_CALL(env, napi_create_object(env, &falloc));
  NAPI_CALL(env, napi_create_object(env, &fadv));
  if (!set_int_property(env, falloc, "DEFAULT", 0) || !set_int_property(env, falloc, "KEEP_SIZE", FALLOC_FL_KEEP_SIZE) ||
      !set_int_property(env, falloc, "PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE) ||
      !set_int_property(env, falloc, "ZERO_RANGE", FALLOC_FL_ZERO_RANGE) ||
      !set_int_property(env, fadv, "NORMAL", POSIX_FADV_NORMAL) ||
      !set_int_property(env, fadv, "RANDOM", POSIX_FADV_RANDOM) ||
      !set_int_property(env, fadv, "SEQUENTIAL", POSIX_FADV_SEQUENTIAL) ||
      !set_int_property(env, fadv, "WILLNEED", POSIX_FADV_WILLNEED) ||
      !set_int_property(env, fadv, "DONTNEED", POSIX_FADV_DONTNEED) ||
      !set_int_property(env, fadv, "NOREUSE", POSIX_FADV_NOREUSE)) {
    throw_napi_failure(env, "cannot define constants");
    return NULL;
  }
  NAPI_CALL(env, napi_set_named_property(env, exports, "FALLOC", falloc));
  NAPI_CALL(env, napi_set_named_property(env, exports, "FADVISE", fadv));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
