/*
 * qcow2fuse native addon (N-API, C): what Node cannot do by itself, each call small and audited,
 * one part per concern (qcow2fuse.h lists the shared helpers):
 *   aligned.c       aligned memory for O_DIRECT
 *   file.c          fallocate, fadvise, OFD locks, O_DIRECT alignment
 *   codecs.c        QEMU-compatible zlib/zstd cluster codecs on the threadpool
 *   aio.c           Linux native AIO on the event loop
 *   threadio.c      a pool of our own threads for pread/pwrite (buffered files)
 *   fuse_session.c  a libfuse3 low-level FUSE session served on the event loop
 * This file only registers them.
 */
#include "qcow2fuse.h"

static napi_value init(napi_env env, napi_value exports) {
  if (!register_aligned(env, exports) || !register_file(env, exports) || !register_codecs(env, exports) ||
      !register_aio(env, exports) || !register_thread_io(env, exports) || !register_fuse_session(env, exports)) {
    return NULL;
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
