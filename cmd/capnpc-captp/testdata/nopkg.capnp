@0x953f79508d43977b;
# No $Go.package: capnpc-captp must refuse it with an error.
interface Lonely {
  call @0 () -> ();
}
