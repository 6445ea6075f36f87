// The Test interface (internal/testcapnp/test.capnp) implemented with the
// Cap'n Proto C++ reference library, mirroring the Go implementation in
// internal/testimpl method by method. Shared by test_server.c++ and
// test_client.c++.
//
// test.capnp.h is generated at build time (capnp compile -oc++) by the Go
// test helper in internal/cppinterop; it is not committed.

#pragma once

#include "test.capnp.h"

#include <capnp/capability.h>
#include <kj/async.h>
#include <kj/debug.h>
#include <kj/exception.h>
#include <kj/string.h>
#include <kj/vector.h>

#include <stdint.h>

namespace captp_interop {

// Counters observed by the Go tests (through the programs' stdin/stdout
// control lines). Everything runs on the one event-loop thread.
struct Counters {
  int64_t live = 0;            // TestImpl objects constructed and not yet destroyed
  int64_t blockStarted = 0;    // block() calls that started
  int64_t blockCancelled = 0;  // block() calls whose promise was destroyed (cancelled)
  int64_t echoes = 0;          // echo() calls served
};

inline Counters counters;

// BlockGuard is attached to the never-resolving promise of block(): the RPC
// system destroys that promise when the call is cancelled (the caller sent
// Finish) or the connection ends, which runs the destructor.
class BlockGuard {
public:
  BlockGuard() = default;
  BlockGuard(BlockGuard&& other): armed(other.armed) { other.armed = false; }
  BlockGuard(const BlockGuard&) = delete;
  ~BlockGuard() noexcept(false) {
    if (armed) ++counters.blockCancelled;
  }

private:
  bool armed = true;
};

inline kj::Exception makeException(kj::Exception::Type type, kj::StringPtr reason) {
  return kj::Exception(type, __FILE__, __LINE__, kj::heapString(reason));
}

class TestImpl final: public Test::Server {
public:
  explicit TestImpl(kj::StringPtr name): objName(kj::heapString(name)) { ++counters.live; }

  ~TestImpl() noexcept(false) {
    // Like testimpl: an outstanding promise breaks when its object goes.
    KJ_IF_MAYBE(f, fulfiller) {
      (*f)->reject(makeException(kj::Exception::Type::DISCONNECTED,
                                 kj::str("test object ", objName, " shut down")));
    }
    --counters.live;
  }

  kj::StringPtr getName() const { return objName; }
  kj::ArrayPtr<const uint32_t> getLog() const { return seqLog.asPtr(); }

protected:
  kj::Promise<void> echo(EchoContext context) override {
    ++counters.echoes;
    auto params = context.getParams();
    // Null stays null; empty stays empty.
    if (params.hasData()) context.getResults().setData(params.getData());
    return kj::READY_NOW;
  }

  kj::Promise<void> fail(FailContext context) override {
    auto params = context.getParams();
    kj::Exception::Type type;
    switch (params.getKind()) {
      case ExceptionKind::FAILED: type = kj::Exception::Type::FAILED; break;
      case ExceptionKind::OVERLOADED: type = kj::Exception::Type::OVERLOADED; break;
      case ExceptionKind::DISCONNECTED: type = kj::Exception::Type::DISCONNECTED; break;
      case ExceptionKind::UNIMPLEMENTED: type = kj::Exception::Type::UNIMPLEMENTED; break;
      default:
        return makeException(kj::Exception::Type::FAILED,
                             kj::str("fail: unknown exception kind ",
                                     static_cast<uint16_t>(params.getKind())));
    }
    return makeException(type, params.getReason());
  }

  kj::Promise<void> block(BlockContext context) override {
    // Without this the C++ RPC system lets the call run on after Finish.
    context.allowCancellation();
    ++counters.blockStarted;
    return kj::Promise<void>(kj::NEVER_DONE).attach(BlockGuard());
  }

  kj::Promise<void> child(ChildContext context) override {
    auto childName = context.getParams().getName();
    context.getResults().setChild(kj::heap<TestImpl>(childName));
    return kj::READY_NOW;
  }

  kj::Promise<void> name(NameContext context) override {
    context.getResults().setName(objName);
    return kj::READY_NOW;
  }

  kj::Promise<void> callBack(CallBackContext context) override {
    auto params = context.getParams();
    auto req = params.getCb().echoRequest();
    if (params.hasData()) req.setData(params.getData());
    return req.send().then(
        [context](capnp::Response<Test::EchoResults>&& resp) mutable {
          if (resp.hasData()) context.getResults().setData(resp.getData());
        },
        [](kj::Exception&& e) {
          kj::throwFatalException(
              kj::Exception(e.getType(), __FILE__, __LINE__,
                            kj::str("callBack: ", e.getDescription())));
        });
  }

  kj::Promise<void> hold(HoldContext context) override {
    held = context.getParams().getCap();
    return kj::READY_NOW;
  }

  kj::Promise<void> dropHeld(DropHeldContext context) override {
    held = nullptr;
    return kj::READY_NOW;
  }

  kj::Promise<void> getHeld(GetHeldContext context) override {
    KJ_IF_MAYBE(h, held) { context.getResults().setCap(*h); }
    return kj::READY_NOW;
  }

  kj::Promise<void> promise(PromiseContext context) override {
    auto paf = kj::newPromiseAndFulfiller<Test::Client>();
    KJ_IF_MAYBE(old, fulfiller) {
      (*old)->reject(makeException(kj::Exception::Type::FAILED,
                                   "promise superseded by a newer promise() call"));
    }
    fulfiller = kj::mv(paf.fulfiller);
    context.getResults().setCap(Test::Client(kj::mv(paf.promise)));
    return kj::READY_NOW;
  }

  kj::Promise<void> resolvePromise(ResolvePromiseContext context) override {
    KJ_IF_MAYBE(f, fulfiller) {
      auto ful = kj::mv(*f);
      fulfiller = nullptr;
      ful->fulfill(context.getParams().getCap());
      return kj::READY_NOW;
    }
    return makeException(kj::Exception::Type::FAILED, "no outstanding promise");
  }

  kj::Promise<void> breakPromise(BreakPromiseContext context) override {
    KJ_IF_MAYBE(f, fulfiller) {
      auto ful = kj::mv(*f);
      fulfiller = nullptr;
      ful->reject(makeException(kj::Exception::Type::FAILED, context.getParams().getReason()));
      return kj::READY_NOW;
    }
    return makeException(kj::Exception::Type::FAILED, "no outstanding promise");
  }

  kj::Promise<void> seq(SeqContext context) override {
    auto n = context.getParams().getN();
    seqLog.add(n);
    context.getResults().setN(n);
    return kj::READY_NOW;
  }

  kj::Promise<void> log(LogContext context) override {
    auto ns = context.getResults().initNs(seqLog.size());
    for (size_t i = 0; i < seqLog.size(); i++) ns.set(i, seqLog[i]);
    return kj::READY_NOW;
  }

private:
  kj::String objName;
  kj::Vector<uint32_t> seqLog;
  kj::Maybe<Test::Client> held;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<Test::Client>>> fulfiller;
};

}  // namespace captp_interop
