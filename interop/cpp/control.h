// Line-oriented control channel between a Go test and a C++ test program:
// commands arrive on stdin, one per line; replies go to stdout, one per
// line. Reading is asynchronous on the program's event loop, so RPC keeps
// being served while the program waits for a command.

#pragma once

#include <kj/async-io.h>
#include <kj/string.h>
#include <kj/vector.h>

#include <stdarg.h>
#include <stdio.h>

namespace captp_interop {

// say prints one line to stdout and flushes it, so the Go side sees it at
// once.
inline void say(const char* format, ...) __attribute__((format(printf, 1, 2)));
inline void say(const char* format, ...) {
  va_list ap;
  va_start(ap, format);
  vfprintf(stdout, format, ap);
  va_end(ap);
  fputc('\n', stdout);
  fflush(stdout);
}

class LineReader {
public:
  explicit LineReader(kj::Own<kj::AsyncInputStream> in): in(kj::mv(in)) {}

  // readLine resolves to the next line without its newline, or to null at
  // end of input.
  kj::Promise<kj::Maybe<kj::String>> readLine() {
    for (size_t i = 0; i < pending.size(); i++) {
      if (pending[i] == '\n') {
        auto line = kj::heapString(pending.begin(), i);
        kj::Vector<char> rest;
        rest.addAll(pending.begin() + i + 1, pending.end());
        pending = kj::mv(rest);
        return kj::Maybe<kj::String>(kj::mv(line));
      }
    }
    if (eof) return kj::Maybe<kj::String>(nullptr);
    return in->tryRead(buf, 1, sizeof(buf)).then([this](size_t n) {
      if (n == 0) {
        eof = true;
        pending.clear();  // a partial last line is ignored
      } else {
        pending.addAll(buf, buf + n);
      }
      return readLine();
    });
  }

private:
  kj::Own<kj::AsyncInputStream> in;
  char buf[512];
  kj::Vector<char> pending;
  bool eof = false;
};

}  // namespace captp_interop
