/*
 * Promise-returning jobs on the libuv threadpool (qcow2fuse.h: job_t). The part's execute runs on a
 * pool thread; settle and release run on the loop thread, where the promise is resolved or rejected.
 */
#include "qcow2fuse.h"

#include <errno.h>
#include <stdlib.h>

job_t *job_new(napi_env env, size_t bytes, void (*execute)(job_t *), napi_value (*settle)(napi_env, job_t *, bool *),
               void (*release)(job_t *)) {
  job_t *job = calloc(1, bytes);
  if (job == NULL) {
    throw_errno(env, ENOMEM, "calloc");
    return NULL;
  }
  job->execute = execute;
  job->settle = settle;
  job->release = release;
  return job;
}

/* Free the job and everything it holds (loop thread). */
static void job_free(napi_env env, job_t *job) {
  for (int i = 0; i < 2; i++) {
    if (job->refs[i] != NULL) {
      napi_delete_reference(env, job->refs[i]);
    }
  }
  if (job->release != NULL) {
    job->release(job);
  }
  if (job->work != NULL) {
    napi_delete_async_work(env, job->work);
  }
  free(job);
}

bool job_hold(napi_env env, job_t *job, int slot, napi_value value) {
  if (napi_create_reference(env, value, 1, &job->refs[slot]) != napi_ok) {
    job_free(env, job);
    throw_napi_failure(env, "napi_create_reference");
    return false;
  }
  return true;
}

static void job_execute(napi_env env, void *data) {
  job_t *job = data;
  job->execute(job);
}

static void job_complete(napi_env env, napi_status status, void *data) {
  job_t *job = data;
  napi_value value = NULL;
  bool reject = true;
  if (status != napi_ok) {
    value = make_coded_error(env, "ECANCELED", "native job cancelled");
  } else {
    value = job->settle(env, job, &reject);
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
  job_free(env, job);
}

napi_value job_queue(napi_env env, job_t *job, const char *resource_name) {
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
    job_free(env, job);
    throw_napi_failure(env, "cannot queue native job");
    return NULL;
  }
  return promise;
}
