{
  "targets": [
    {
      "target_name": "qcow2fuse_native",
      "sources": ["addon.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"],
      "defines": ["_GNU_SOURCE", "NAPI_VERSION=8"],
      "libraries": ["-lz", "-lzstd"]
    }
  ]
}
