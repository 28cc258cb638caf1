/*
 * Aligned memory for O_DIRECT:
 *   alignedBuffer(bytes, alignment)   posix_memalign-backed Buffer, zero-filled, freed by a finalizer
 *   bufferAddressAlignment(view)      largest power of two dividing the view's address
 */
#include "qcow2fuse.h"

#include <stdlib.h>
#include <string.h>

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

bool register_aligned(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"alignedBuffer", NULL, aligned_buffer, NULL, NULL, NULL, napi_enumerable, NULL},
      {"bufferAddressAlignment", NULL, buffer_address_alignment, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return define_functions(env, exports, functions, sizeof functions / sizeof functions[0]);
}
