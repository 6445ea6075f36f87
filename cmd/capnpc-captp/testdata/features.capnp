@0xcc4ab4777110f0bc;
# capnpc-captp's test schema for corners of the generator: user-declared
# parameter and result structs, $Go.name renames, a result field whose
# accessor would clash with core.PendingCall's, a union Data field,
# generic methods and interfaces, nested interfaces, multiple
# inheritance. TestGeneratedCodeCompiles compiles its output.

using Go = import "/go.capnp";
$Go.package("gentest");
$Go.import("github.com/captp-go/captp/cmd/capnpc-captp/gentest");

struct Req {
  x @0 :UInt32;
}

struct Resp {
  wait @0 :Features;
  data @1 :Data;
  u :union {
    a @2 :Data;
    b @3 :Void;
  }
  string @4 :Text;
}

interface Features {
  plain @0 Req -> Resp;
  renamed @1 () -> (d :Data $Go.name("payload")) $Go.name("other");
  generic @2 [T] (v :T) -> ();
  box @3 () -> (b :Box(Text), n :Nested);
  interface Nested {
    hi @0 () -> ();
  }
}

interface Box(T) {
  get @0 () -> (v :T);
}

interface Both extends(Features, Features.Nested) {
  both @0 () -> (self :Both);
}

# Empty has no methods; its server answers everything as unimplemented.
interface Empty {}
