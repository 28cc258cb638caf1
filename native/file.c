/*
 * File syscalls Node has no binding for:
 *   fallocate(fd, mode, offset, length)   Promise, libuv threadpool
 *   fadvise(fd, offset, length, advice)   Promise, libuv threadpool
 *   ofdSetLock(fd, type, start, len)      F_OFD_SETLK, non-blocking; throws EAGAIN/EACCES on conflict
 *   ofdGetLock(fd, type, start, len)      F_OFD_GETLK: null or {type, start, len, pid}
 *   dioAlignment(fd)                      statx(STATX_DIOALIGN) or the 4096 fallback
 * and the FALLOC / FADVISE constants.
 */
#include "qcow2fuse.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif

/* Fallback O_DIRECT alignment when the kernel cannot tell (statx without STATX_DIOALIGN). */
#define DIO_FALLBACK_ALIGN 4096u

/* ------------------------------------------------------- fallocate, fadvise */

typedef struct {
  job_t job;
  bool fadvise;
  int fd;
  int mode; /* fallocate mode or fadvise advice */
  int64_t offset;
  int64_t length;
  int err; /* errno of the failed syscall, 0 on success */
} file_job_t;

static void file_execute(job_t *base) {
  file_job_t *job = (file_job_t *)base;
  if (job->fadvise) {
    job->err = posix_fadvise(job->fd, (off_t)job->offset, (off_t)job->length, job->mode);
    return;
  }
  int ret;
  do {
    ret = fallocate(job->fd, job->mode, (off_t)job->offset, (off_t)job->length);
  } while (ret != 0 && errno == EINTR);
  job->err = ret == 0 ? 0 : errno;
}

static napi_value file_settle(napi_env env, job_t *base, bool *reject) {
  file_job_t *job = (file_job_t *)base;
  if (job->err != 0) {
    *reject = true;
    return make_errno_error(env, job->err, job->fadvise ? "posix_fadvise" : "fallocate");
  }
  napi_value value;
  *reject = false;
  return napi_get_undefined(env, &value) == napi_ok ? value : NULL;
}

static napi_value file_job_queue(napi_env env, bool fadvise, int fd, int mode, int64_t offset, int64_t length) {
  file_job_t *job = (file_job_t *)job_new(env, sizeof *job, file_execute, file_settle, NULL);
  if (job == NULL) {
    return NULL;
  }
  job->fadvise = fadvise;
  job->fd = fd;
  job->mode = mode;
  job->offset = offset;
  job->length = length;
  return job_queue(env, &job->job, fadvise ? "qcow2fuse.fadvise" : "qcow2fuse.fallocate");
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
  return file_job_queue(env, false, fd, mode, offset, length);
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
  return file_job_queue(env, true, fd, advice, offset, length);
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

/* The shared part of ofdSetLock/ofdGetLock: parse (fd, type, start, len) into `fl` and run
 * fcntl(cmd) on it (retrying EINTR). False with a pending JS exception on bad arguments or failure. */
static bool ofd_fcntl(napi_env env, napi_callback_info info, int cmd, const char *what, bool allow_unlock, struct flock *fl) {
  napi_value argv[4];
  int fd;
  short type;
  int64_t start, length;
  if (!get_args(env, info, 4, argv) || !get_fd(env, argv[0], &fd) || !parse_lock_type(env, argv[1], allow_unlock, &type) ||
      !get_safe_uint(env, argv[2], "start", &start) || !get_safe_uint(env, argv[3], "length", &length)) {
    return false;
  }
  memset(fl, 0, sizeof *fl);
  fl->l_type = type;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)length;
  int ret;
  do {
    ret = fcntl(fd, cmd, fl);
  } while (ret == -1 && errno == EINTR);
  if (ret == -1) {
    throw_errno(env, errno, what);
    return false;
  }
  return true;
}

/* ofdSetLock(fd, type, start, len): F_OFD_SETLK, never waits; len 0 means "to the end of file". */
static napi_value js_ofd_set_lock(napi_env env, napi_callback_info info) {
  struct flock fl;
  if (!ofd_fcntl(env, info, F_OFD_SETLK, "fcntl(F_OFD_SETLK)", true, &fl)) return NULL;
  napi_value undefined;
  NAPI_CALL(env, napi_get_undefined(env, &undefined));
  return undefined;
}

/* ofdGetLock(fd, type, start, len): the first conflicting lock held through another open file
 * description, as null or {type, start, len, pid} (pid is -1 for OFD locks). */
static napi_value js_ofd_get_lock(napi_env env, napi_callback_info info) {
  struct flock fl;
  if (!ofd_fcntl(env, info, F_OFD_GETLK, "fcntl(F_OFD_GETLK)", false, &fl)) return NULL;
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

/* ---------------------------------------------------------------- module */

static bool define_constants(napi_env env, napi_value exports) {
  napi_value falloc, fadv;
  if (napi_create_object(env, &falloc) != napi_ok || napi_create_object(env, &fadv) != napi_ok ||
      !set_int_property(env, falloc, "DEFAULT", 0) || !set_int_property(env, falloc, "KEEP_SIZE", FALLOC_FL_KEEP_SIZE) ||
      !set_int_property(env, falloc, "PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE) ||
      !set_int_property(env, falloc, "ZERO_RANGE", FALLOC_FL_ZERO_RANGE) ||
      !set_int_property(env, fadv, "NORMAL", POSIX_FADV_NORMAL) ||
      !set_int_property(env, fadv, "RANDOM", POSIX_FADV_RANDOM) ||
      !set_int_property(env, fadv, "SEQUENTIAL", POSIX_FADV_SEQUENTIAL) ||
      !set_int_property(env, fadv, "WILLNEED", POSIX_FADV_WILLNEED) ||
      !set_int_property(env, fadv, "DONTNEED", POSIX_FADV_DONTNEED) ||
      !set_int_property(env, fadv, "NOREUSE", POSIX_FADV_NOREUSE) ||
      napi_set_named_property(env, exports, "FALLOC", falloc) != napi_ok ||
      napi_set_named_property(env, exports, "FADVISE", fadv) != napi_ok) {
    throw_napi_failure(env, "cannot define constants");
    return false;
  }
  return true;
}

bool register_file(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fadvise", NULL, js_fadvise, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdSetLock", NULL, js_ofd_set_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdGetLock", NULL, js_ofd_get_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dioAlignment", NULL, js_dio_alignment, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return define_functions(env, exports, functions, sizeof functions / sizeof functions[0]) &&
         define_constants(env, exports);
}
