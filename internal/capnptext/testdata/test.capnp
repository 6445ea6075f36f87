# Test schema for internal/capnptext: every type the text form covers.
@0xc4a1f0e2b3d49a01;

enum Color {
  red @0;
  green @1;
  blue @2;
}

struct Inner {
  a @0 :Int32;
  s @1 :Text;
}

struct All {
  v @0 :Void;
  b @1 :Bool;
  i8 @2 :Int8;
  i16 @3 :Int16;
  i32 @4 :Int32;
  i64 @5 :Int64;
  u8 @6 :UInt8;
  u16 @7 :UInt16;
  u32 @8 :UInt32;
  u64 @9 :UInt64;
  f32 @10 :Float32;
  f64 @11 :Float64;
  t @12 :Text;
  d @13 :Data;
  e @14 :Color;
  inner @15 :Inner;
  li @16 :List(Int32);
  lb @17 :List(Bool);
  lt @18 :List(Text);
  ld @19 :List(Data);
  ls @20 :List(Inner);
  le @21 :List(Color);
  ll @22 :List(List(UInt8));
  lf @23 :List(Float64);
  lv @24 :List(Void);
  union {
    none @25 :Void;
    num @26 :Int64;
    text @27 :Text;
    grp :group {
      x @28 :Int32;
      y @29 :Int32;
    }
  }
  g :group {
    p @30 :UInt16;
    q @31 :Text;
  }
  nu :union {
    one @32 :UInt8;
    two @33 :Inner;
  }
  cap @34 :File;
  any @35 :AnyPointer;
  l32 @36 :List(Float32);
  li8 @37 :List(Int8);
  lu64 @38 :List(UInt64);
}

struct Defaults {
  i @0 :Int32 = 42;
  b @1 :Bool = true;
  f @2 :Float64 = 1.5;
  e @3 :Color = blue;
  t @4 :Text = "dflt";
  d @5 :Data = 0x"0102";
  s @6 :Inner = (a = 7, s = "x");
  l @7 :List(Int32) = [1, 2];
  u @8 :UInt64 = 0xffffffffffffffff;
  n @9 :Int8 = -5;
  f32 @10 :Float32 = -0.25;
}

# Code order differs from ordinal order.
struct Reordered {
  b @1 :Int32;
  a @0 :Text;
}

struct Info {
  name @0 :Text;
  file @1 :File;
}

interface Base {
  ping @0 () -> ();
}

interface File extends(Base) {
  size @0 () -> (size :UInt64);
  read @1 (offset :UInt64, n :UInt32) -> (data :Data);
}

interface Dir extends(Base) {
  getFile @0 (name :Text) -> (file :File);
  list @1 () -> (names :List(Text));
  sub @2 (name :Text) -> (dir :Dir, info :Inner);
  stat @3 (name :Text) -> (info :Info);
  both @4 () -> (a :File, b :File);
  # The capability's field index (2) differs from its pointer index (1).
  mixed @5 () -> (count :UInt32, name :Text, file :File);
  hold @6 () -> (h :Holder);
}

struct Holder {
  n @0 :Int64;
  g :group {
    t @1 :Text;
    f @2 :File;
  }
}

interface Store extends(Dir, File) {
  put @0 All -> Inner;
}

struct Outer {
  struct Nested {
    x @0 :Int8;
  }
  n @0 :Nested;
  ln @1 :List(Nested);
}

# A second interface with a method called size makes a bare "size"
# ambiguous.
interface Other {
  size @0 () -> (n :UInt32);
}

struct HasCaps {
  f @0 :File;
  lf @1 :List(File);
  x @2 :Int32;
}
