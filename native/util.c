/*
 * Helpers every part of the addon shares: Errors for failed syscalls and N-API calls, and argument
 * parsing with the addon's conventions (qcow2fuse.h).
 */
#include "qcow2fuse.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---------------------------------------------------------------- errors */

void throw_napi_failure(napi_env env, const char *what) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) {
    napi_throw_error(env, "ERR_NATIVE", what);
  }
}

/* Build an Error for a failed syscall: {code: errno name, errno: -err, syscall}. */
napi_value make_errno_error(napi_env env, int err, const char *syscall_name) {
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

void throw_errno(napi_env env, int err, const char *syscall_name) {
  napi_value error_v = make_errno_error(env, err, syscall_name);
  if (error_v == NULL) {
    throw_napi_failure(env, "cannot create error object");
    return;
  }
  napi_throw(env, error_v);
}

/* An Error with only a code (no errno), e.g. EBADCOMPRESSED. */
napi_value make_coded_error(napi_env env, const char *code, const char *message) {
  napi_value code_v, message_v, error_v;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &message_v) != napi_ok ||
      napi_create_error(env, code_v, message_v, &error_v) != napi_ok) {
    return NULL;
  }
  return error_v;
}

/* ------------------------------------------------------ argument parsing */

bool get_args(napi_env env, napi_callback_info info, size_t expected, napi_value *argv) {
  size_t argc = expected;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_napi_failure(env, "napi_get_cb_info");
    return false;
  }
  if (argc < expected) {
    char message[96];
    snprintf(message, sizeof message, "expected %zu arguments, got %zu", expected, argc);
    napi_throw_type_error(env, "ERR_MISSING_ARGS", message);
    return false;
  }
  return true;
}

/* A safe non-negative integer carried as a double (offsets, lengths). */
bool get_safe_uint(napi_env env, napi_value value, const char *name, int64_t *out) {
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

bool get_fd(napi_env env, napi_value value, int *out) {
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

bool get_small_int(napi_env env, napi_value value, const char *name, int *out) {
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

bool get_io_submit_args(napi_env env, napi_callback_info info, const char *handle_kind, io_submit_args_t *out) {
  napi_value argv[6];
  if (!get_args(env, info, 6, argv)) {
    return false;
  }
  if (napi_get_value_external(env, argv[0], &out->handle) != napi_ok || out->handle == NULL) {
    char message[96];
    snprintf(message, sizeof message, "not %s handle", handle_kind);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
    return false;
  }
  if (!get_small_int(env, argv[1], "slot", &out->slot)) {
    return false;
  }
  if (napi_get_value_bool(env, argv[2], &out->write) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "write must be a boolean");
    return false;
  }
  return get_fd(env, argv[3], &out->fd) && get_bytes(env, argv[4], "view", &out->data, &out->bytes) &&
         get_safe_uint(env, argv[5], "offset", &out->offset);
}

bool completion_sink_init(napi_env env, completion_sink_t *sink, napi_value out_slots, napi_value out_results,
                          napi_value callback, const char *name) {
  napi_value resource_name;
  return napi_create_reference(env, out_slots, 1, &sink->out_slots_ref) == napi_ok &&
         napi_create_reference(env, out_results, 1, &sink->out_results_ref) == napi_ok &&
         napi_create_reference(env, callback, 1, &sink->callback_ref) == napi_ok &&
         napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name) == napi_ok &&
         napi_async_init(env, NULL, resource_name, &sink->async_ctx) == napi_ok;
}

void completion_sink_deliver(napi_env env, completion_sink_t *sink, uint32_t count) {
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) {
    return;
  }
  napi_value callback, recv, argv[1], result;
  if (napi_get_reference_value(env, sink->callback_ref, &callback) == napi_ok && callback != NULL &&
      napi_get_global(env, &recv) == napi_ok && napi_create_uint32(env, count, &argv[0]) == napi_ok) {
    napi_status status = napi_make_callback(env, sink->async_ctx, recv, callback, 1, argv, &result);
    if (status == napi_pending_exception) {
      napi_value error;
      if (napi_get_and_clear_last_exception(env, &error) == napi_ok) {
        napi_fatal_exception(env, error);
      }
    }
  }
  napi_close_handle_scope(env, scope);
}

void completion_sink_release(napi_env env, completion_sink_t *sink) {
  napi_delete_reference(env, sink->callback_ref);
  napi_delete_reference(env, sink->out_slots_ref);
  napi_delete_reference(env, sink->out_results_ref);
  napi_async_destroy(env, sink->async_ctx);
}

/* Short ASCII string argument (lock type, codec name) into buf. */
bool get_short_string(napi_env env, napi_value value, const char *name, char *buf, size_t size) {
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
bool get_bytes(napi_env env, napi_value value, const char *name, uint8_t **data, size_t *bytes) {
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

/* A typed array argument of the given type with at least `min_length` elements. */
bool get_typed_array(napi_env env, napi_value value, napi_typedarray_type want, size_t min_length,
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

bool set_int_property(napi_env env, napi_value object, const char *name, int32_t value) {
  napi_value v;
  return napi_create_int32(env, value, &v) == napi_ok && napi_set_named_property(env, object, name, v) == napi_ok;
}

bool define_functions(napi_env env, napi_value exports, const napi_property_descriptor *functions, size_t count) {
  if (napi_define_properties(env, exports, count, functions) != napi_ok) {
    throw_napi_failure(env, "napi_define_properties");
    return false;
  }
  return true;
}
