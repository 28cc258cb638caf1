# qcow2fuse native addon. libfuse3 (fuse_session.c) is linked dynamically through pkg-config fuse3.
# zlib, zstd and libdeflate (zlib clusters' fast decoder, codecs.c) are linked statically from the
# system's static libraries (zlib1g-dev, libzstd-dev, libdeflate-dev) with their symbols kept local: Node exports its own bundled zlib (a
# Chromium fork whose deflate output differs), which would otherwise interpose on ours. Linked this
# way our codecs are the very library build qemu-img uses, so compressed clusters match QEMU's bytes.
{
  "targets": [
    {
      "target_name": "qcow2fuse_native",
      "sources": ["addon.c", "util.c", "jobs.c", "aligned.c", "file.c", "codecs.c", "aio.c", "threadio.c", "fuse_session.c", "fuse_kernel_worker.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"],
      "defines": ["_GNU_SOURCE", "NAPI_VERSION=8"],
      "include_dirs": ["<!@(pkg-config --cflags-only-I fuse3 | sed s/-I//g)"],
      "libraries": [
        "-Wl,--exclude-libs,ALL",
        "-Wl,-Bstatic", "-lz", "-lzstd", "-ldeflate", "-Wl,-Bdynamic",
        "<!@(pkg-config --libs fuse3)"
      ]
    }
  ]
}
