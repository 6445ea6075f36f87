// Package cppinterop tests captp against the Cap'n Proto C++ reference
// implementation (Debian's libcapnp-dev), in both directions, over Unix
// sockets and TCP loopback, and compares how both handle hostile input.
//
// Everything is in the tests. TestMain compiles the C++ programs in
// interop/cpp (a Test server and a scenario-driven Test client) with g++
// and `pkg-config capnp-rpc`, after generating C++ code for
// internal/testcapnp/test.capnp with `capnp compile -oc++`. The binaries are
// cached under os.UserCacheDir()/captp-cpp/ by a hash of their sources, the
// schema and the toolchain versions, so only the first run pays for the
// compilation (a few seconds).
//
// When g++, pkg-config, capnp or libcapnp-dev is missing, every test skips
// with a message naming the Debian packages to install:
//
//	apt-get install capnproto libcapnp-dev pkg-config g++
//
// (`make deps` does that.) A compilation error is a test failure, not a
// skip.
package cppinterop
