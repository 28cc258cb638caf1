/*
 * The kernel-side helper thread of a FUSE session (fuse_session.c): the requests a session must make
 * of the kernel about its own mount, which the thread that serves the mount cannot make itself.
 *
 *   inval(ino, offset, length)      FUSE_NOTIFY_INVAL_INODE: drop the inode's cached pages in that range
 *                                   (and its cached attributes)
 *   write_back(path, offset, token) write the kernel's dirty pages of mountpoint/path from offset to
 *                                   the end back to the daemon (sync_file_range); done(token, errno)
 *
 * Why a thread: both wait for the kernel, and the kernel waits for the daemon. Invalidating a page
 * under writeback waits for that writeback, which ends only when the daemon answers its WRITE; a
 * write-back is WRITE requests the daemon must serve. Made from the loop thread, which serves every
 * request, either would deadlock; made here, the loop keeps serving while this thread waits.
 *
 * The write-back's file is closed after done() is posted: closing sends FLUSH, which takes the inode
 * lock that the lseek waiting for this write-back holds until the daemon answers it.
 *
 * Notifications go out on the worker's own dup() of the /dev/fuse fd, so a stopped session can free
 * its libfuse state at once: the thread finishes the job it is in, drops the rest, closes its fd and
 * frees the worker. (A job still waiting on the mount when the session is torn down while mounted —
 * a notification on pages under writeback, a write-back's open — keeps the connection open through
 * that dup until the process exits; the daemon tears its session down after the unmount, when no
 * job can be waiting.)
 */
#include "qcow2fuse.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* The FUSE protocol's notification header and FUSE_NOTIFY_INVAL_INODE body (linux/fuse.h). */
#define FUSE_NOTIFY_INVAL_INODE_CODE 2
struct notify_out_header {
  uint32_t len;
  int32_t error;
  uint64_t unique;
};
struct notify_inval_inode {
  uint64_t ino;
  int64_t off;
  int64_t len;
};

typedef enum { JOB_INVAL, JOB_WRITE_BACK } job_kind_t;

typedef struct kernel_job {
  struct kernel_job *next;
  job_kind_t kind;
  uint64_t ino;
  int64_t offset;
  int64_t length;
  double token;
  int err;
  char *path; /* JOB_WRITE_BACK: absolute path of the file on the mount */
} kernel_job_t;

struct kernel_worker {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  kernel_job_t *queue_head, *queue_tail;
  kernel_job_t *done_head; /* finished write-backs, in reverse order */
  bool stop;
  int refs;           /* the loop thread's and the worker thread's */
  int fd;             /* dup of /dev/fuse */
  char *mountpoint;
  uv_async_t *async;  /* NULL once stopped */
  kernel_worker_done_fn done;
  void *ctx;
};

static void job_free(kernel_job_t *job) {
  free(job->path);
  free(job);
}

static void jobs_free(kernel_job_t *job) {
  while (job != NULL) {
    kernel_job_t *next = job->next;
    job_free(job);
    job = next;
  }
}

/* Drop one reference (with mu held); the last one frees the worker. Returns true when freed. */
static bool worker_unref_locked(kernel_worker_t *w) {
  if (--w->refs > 0) {
    return false;
  }
  pthread_mutex_unlock(&w->mu);
  jobs_free(w->queue_head);
  jobs_free(w->done_head);
  close(w->fd);
  free(w->mountpoint);
  pthread_cond_destroy(&w->cv);
  pthread_mutex_destroy(&w->mu);
  free(w);
  return true;
}

/* Send FUSE_NOTIFY_INVAL_INODE; 0 or an errno (ENOENT: the kernel has no such inode cached). */
static int send_inval(int fd, const kernel_job_t *job) {
  struct notify_out_header header = {sizeof header + sizeof(struct notify_inval_inode), FUSE_NOTIFY_INVAL_INODE_CODE, 0};
  struct notify_inval_inode body = {job->ino, job->offset, job->length};
  struct iovec iov[2] = {{&header, sizeof header}, {&body, sizeof body}};
  ssize_t n;
  do {
    n = writev(fd, iov, 2);
  } while (n < 0 && errno == EINTR);
  return n < 0 ? errno : 0;
}

/* Open the file, write its dirty pages from offset on back; the open fd (to close after done) or -1. */
static int write_back(kernel_job_t *job) {
  int fd = open(job->path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    job->err = errno;
    return -1;
  }
  job->err = sync_file_range(fd, job->offset, 0,
                             SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) == 0 ? 0 : errno;
  return fd;
}

static void *worker_main(void *arg) {
  kernel_worker_t *w = arg;
  pthread_mutex_lock(&w->mu);
  for (;;) {
    while (!w->stop && w->queue_head == NULL) {
      pthread_cond_wait(&w->cv, &w->mu);
    }
    if (w->stop) {
      break;
    }
    kernel_job_t *job = w->queue_head;
    w->queue_head = job->next;
    if (w->queue_head == NULL) {
      w->queue_tail = NULL;
    }
    pthread_mutex_unlock(&w->mu);
    int close_fd = -1;
    if (job->kind == JOB_INVAL) {
      send_inval(w->fd, job);
    } else {
      close_fd = write_back(job);
    }
    pthread_mutex_lock(&w->mu);
    if (job->kind == JOB_WRITE_BACK && w->async != NULL) {
      job->next = w->done_head;
      w->done_head = job;
      uv_async_send(w->async);
    } else {
      job_free(job);
    }
    if (close_fd >= 0) {
      pthread_mutex_unlock(&w->mu);
      close(close_fd);
      pthread_mutex_lock(&w->mu);
    }
  }
  if (!worker_unref_locked(w)) {
    pthread_mutex_unlock(&w->mu);
  }
  return NULL;
}

/* Loop thread: report the finished write-backs, oldest first. */
static void worker_on_async(uv_async_t *async) {
  kernel_worker_t *w = async->data;
  pthread_mutex_lock(&w->mu);
  kernel_job_t *done = w->done_head;
  w->done_head = NULL;
  pthread_mutex_unlock(&w->mu);
  kernel_job_t *ordered = NULL;
  while (done != NULL) {
    kernel_job_t *next = done->next;
    done->next = ordered;
    ordered = done;
    done = next;
  }
  for (kernel_job_t *job = ordered; job != NULL; job = job->next) {
    w->done(w->ctx, job->token, job->err);
  }
  jobs_free(ordered);
}

static void async_closed(uv_handle_t *handle) {
  free(handle);
}

kernel_worker_t *kernel_worker_start(uv_loop_t *loop, int fuse_fd, const char *mountpoint, kernel_worker_done_fn done, void *ctx) {
  kernel_worker_t *w = calloc(1, sizeof *w);
  uv_async_t *async = calloc(1, sizeof *async);
  char *mp = strdup(mountpoint);
  int fd = fcntl(fuse_fd, F_DUPFD_CLOEXEC, 0);
  if (w == NULL || async == NULL || mp == NULL || fd < 0 || uv_async_init(loop, async, worker_on_async) != 0) {
    if (fd >= 0) {
      close(fd);
    }
    free(mp);
    free(async);
    free(w);
    return NULL;
  }
  /* Writes to /dev/fuse are handled synchronously by the kernel, whatever the shared O_NONBLOCK says. */
  async->data = w;
  w->async = async;
  w->fd = fd;
  w->mountpoint = mp;
  w->done = done;
  w->ctx = ctx;
  w->refs = 2;
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int err = pthread_create(&thread, &attr, worker_main, w);
  pthread_attr_destroy(&attr);
  if (err != 0) {
    uv_close((uv_handle_t *)async, async_closed);
    w->async = NULL;
    w->refs = 1;
    pthread_mutex_lock(&w->mu);
    worker_unref_locked(w);
    return NULL;
  }
  return w;
}

static bool enqueue(kernel_worker_t *w, kernel_job_t *job) {
  pthread_mutex_lock(&w->mu);
  if (w->stop) {
    pthread_mutex_unlock(&w->mu);
    job_free(job);
    return false;
  }
  if (w->queue_tail == NULL) {
    w->queue_head = job;
  } else {
    w->queue_tail->next = job;
  }
  w->queue_tail = job;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
  return true;
}

bool kernel_worker_inval(kernel_worker_t *w, uint64_t ino, int64_t offset, int64_t length) {
  kernel_job_t *job = calloc(1, sizeof *job);
  if (job == NULL) {
    return false;
  }
  job->kind = JOB_INVAL;
  job->ino = ino;
  job->offset = offset;
  job->length = length;
  return enqueue(w, job);
}

bool kernel_worker_write_back(kernel_worker_t *w, const char *path, int64_t offset, double token) {
  kernel_job_t *job = calloc(1, sizeof *job);
  size_t bytes = strlen(w->mountpoint) + strlen(path) + 2;
  if (job == NULL || (job->path = malloc(bytes)) == NULL) {
    free(job);
    return false;
  }
  snprintf(job->path, bytes, "%s/%s", w->mountpoint, path[0] == '/' ? path + 1 : path);
  job->kind = JOB_WRITE_BACK;
  job->offset = offset;
  job->token = token;
  return enqueue(w, job);
}

void kernel_worker_stop(kernel_worker_t *w) {
  pthread_mutex_lock(&w->mu);
  w->stop = true;
  uv_close((uv_handle_t *)w->async, async_closed);
  w->async = NULL;
  kernel_job_t *queued = w->queue_head;
  w->queue_head = w->queue_tail = NULL;
  pthread_cond_signal(&w->cv);
  if (!worker_unref_locked(w)) {
    pthread_mutex_unlock(&w->mu);
  }
  jobs_free(queued);
}
