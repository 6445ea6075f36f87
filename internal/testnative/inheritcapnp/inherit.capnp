@0xd91ce529566318b7;
# Schema for capnpc-captp's tests: interface inheritance, a streaming
# method, capability results, and a generic interface (which gets no
# native stubs).

using Go = import "/go.capnp";
$Go.package("inheritcapnp");
$Go.import("github.com/captp-go/captp/internal/testnative/inheritcapnp");

# Base is the superclass.
interface Base {
  ping @0 (n :UInt32) -> (n :UInt32);
}

# Derived inherits ping from Base.
interface Derived extends(Base) {
  # pair returns capabilities of both types (pipelining on each).
  pair @0 () -> (base :Base, derived :Derived);
  # write adds len(data) to a total; a streaming method.
  write @1 (data :Data) -> stream;
  total @2 () -> (n :UInt64);
}

# Box is generic: capnpc-captp skips it.
interface Box(T) {
  get @0 () -> (value :T);
}
