/*
 * The transport floor for `npm run bench -- transport`: the same null file the JS servers serve
 * (test/helpers/null-fs-daemon.ts: "/f", 64 GiB, reads answer zeros, writes are dropped), served from
 * C on libfuse3's low-level API by one thread (fuse_session_loop), with the connection our session
 * negotiates (max_write 1 MiB, read-ahead 1 MiB, async direct I/O, 64 background requests).
 * Built at bench time (gcc + pkg-config fuse3). Usage: null-floor MOUNTPOINT (until fusermount3 -u).
 */
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FILE_BYTES (64LL << 30)
#define FILE_INO 2

static char zeros[1 << 20];

static void attr_of(fuse_ino_t ino, struct stat *st) {
  memset(st, 0, sizeof *st);
  st->st_ino = ino;
  st->st_mode = ino == FILE_INO ? S_IFREG | 0644 : S_IFDIR | 0755;
  st->st_nlink = ino == FILE_INO ? 1 : 2;
  st->st_size = ino == FILE_INO ? FILE_BYTES : 4096;
}

static void floor_init(void *userdata, struct fuse_conn_info *conn) {
  conn->max_write = 1 << 20;
  conn->max_readahead = 1 << 20;
  conn->want |= conn->capable & (FUSE_CAP_ASYNC_DIO | FUSE_CAP_ASYNC_READ);
  conn->max_background = 64;
  conn->congestion_threshold = 48;
}

static void floor_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  if (parent != FUSE_ROOT_ID || strcmp(name, "f") != 0) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct fuse_entry_param entry;
  memset(&entry, 0, sizeof entry);
  entry.ino = FILE_INO;
  attr_of(FILE_INO, &entry.attr);
  fuse_reply_entry(req, &entry);
}

static void floor_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  struct stat st;
  attr_of(ino, &st);
  fuse_reply_attr(req, &st, 0);
}

static void floor_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
  floor_getattr(req, ino, fi);
}

static void floor_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  fi->fh = 1;
  fuse_reply_open(req, fi);
}

static void floor_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  fuse_reply_buf(req, zeros, size < sizeof zeros ? size : sizeof zeros);
}

static void floor_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
  fuse_reply_write(req, size);
}

static void floor_ok(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  fuse_reply_err(req, 0);
}

static void floor_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  fuse_reply_err(req, 0);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
    return 2;
  }
  const struct fuse_lowlevel_ops ops = {
      .init = floor_init, .lookup = floor_lookup, .getattr = floor_getattr, .setattr = floor_setattr,
      .open = floor_open, .read = floor_read, .write = floor_write, .flush = floor_ok, .release = floor_ok,
      .fsync = floor_fsync,
  };
  char *args_v[] = {argv[0], "-o", "subtype=nullfloor", NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, args_v);
  struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
  if (se == NULL || fuse_session_mount(se, argv[1]) != 0) {
    return 1;
  }
  int rc = fuse_session_loop(se);
  fuse_session_unmount(se);
  fuse_session_destroy(se);
  return rc == 0 ? 0 : 1;
}
